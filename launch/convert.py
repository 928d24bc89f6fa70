"""Checkpoints in the Hugging Face layout, in and out:

  python -m launch.convert --from_hf=DIR --workdir=OUT [--dtype=bfloat16]
  python -m launch.convert --to_hf=DIR --workdir=IN

--from_hf reads a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory
(config.json, *.safetensors with or without an index, tokenizer.json) into a workdir
that launch.decode and launch.bench accept, that distillation takes as its target
(--config.target_workdir=OUT) and that training starts from (--config.init_from=OUT).
--to_hf writes a workdir's autoregressive LM as a Llama (Qwen2 when it has q/k/v
biases) directory that transformers loads.
"""
from absl import app, flags

from launch import common

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face checkpoint directory to import.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Directory to export the workdir to.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Our workdir (written by --from_hf, read by '
                               '--to_hf).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           '--from_hf: parameter and activation dtype of the imported model.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from launch import conversion
  with common.user_errors_as_messages():
    if bool(_FROM_HF.value) == bool(_TO_HF.value):
      raise ValueError('Give exactly one of --from_hf=DIR (import) and --to_hf=DIR (export).')
    if _FROM_HF.value:
      restored = conversion.import_hf(_FROM_HF.value, _WORKDIR.value, _DTYPE.value)
      print(f'Imported {_FROM_HF.value} into {_WORKDIR.value}: {restored.model.config}')
    else:
      conversion.export_hf(_WORKDIR.value, _TO_HF.value)
      print(f'Exported {_WORKDIR.value} to {_TO_HF.value}')


if __name__ == '__main__':
  app.run(main)
