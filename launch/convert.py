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
import json
import os
import shutil

from absl import app, flags

from launch import common

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face checkpoint directory to import.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Directory to export the workdir to.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Our workdir (written by --from_hf, read by '
                               '--to_hf).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           '--from_hf: parameter and activation dtype of the imported model.')
flags.mark_flags_as_required(['workdir'])


def import_hf(hf_dir: str, workdir: str, dtype: str = 'float32'):
  """HF directory -> workdir (config.json, tokenizer, parameters-only checkpoint)."""
  import ml_collections
  from configs import ar_lm
  from training import checkpoints, hf, objectives
  if checkpoints.has_checkpoint(workdir):
    raise ValueError(f'{workdir} already holds a checkpoint; import into a new workdir.')
  hf_config = hf.read_config(hf_dir)
  block = hf.model_config(hf_config, dtype)
  tokenizer = hf.read_tokenizer(hf_dir, hf_config, hf_config['vocab_size'])
  config = ar_lm.get_config('size=tiny')
  config.model = ml_collections.ConfigDict(block)
  config.tokenizer.kind = 'hf'
  config.tokenizer.vocab_size = tokenizer.vocab_size
  config.imported_from = os.path.abspath(hf_dir)
  params = hf.load_params(hf_dir, objectives.transformer_config(config, tokenizer.vocab_size))
  checkpoints.check_and_save_config(workdir, config)
  tokenizer.save(workdir)
  checkpoints.save_params(workdir, params)
  return checkpoints.restore_model(workdir)


def export_hf(workdir: str, hf_dir: str) -> None:
  """Workdir -> HF directory (config.json, model.safetensors, tokenizer.json if ours is
  an imported one)."""
  import jax.numpy as jnp
  from safetensors.flax import save_file
  from training import checkpoints, hf, tokenizers
  restored = checkpoints.restore_model(workdir)
  if restored.config.family != 'ar_lm':
    raise ValueError(f'{workdir} holds a {restored.config.family!r} model; only autoregressive '
                     'LMs (family ar_lm) export to the Llama layout.')
  config = restored.model.config
  os.makedirs(hf_dir, exist_ok=True)
  tensors = hf.export_tensors(restored.params, config)
  save_file({name: jnp.asarray(value) for name, value in tensors.items()},
            os.path.join(hf_dir, hf.SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf.hf_config(config, restored.tokenizer), f, indent=2)
  if isinstance(restored.tokenizer, tokenizers.HuggingFaceTokenizer):
    shutil.copy(os.path.join(workdir, tokenizers.HuggingFaceTokenizer.FILE),
                os.path.join(hf_dir, 'tokenizer.json'))
  else:
    print(f'Note: the {type(restored.tokenizer).__name__} of {workdir} has no tokenizer.json '
          'form; the exported model takes the same ids (bos/eos/pad in config.json).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  with common.user_errors_as_messages():
    if bool(_FROM_HF.value) == bool(_TO_HF.value):
      raise ValueError('Give exactly one of --from_hf=DIR (import) and --to_hf=DIR (export).')
    if _FROM_HF.value:
      restored = import_hf(_FROM_HF.value, _WORKDIR.value, _DTYPE.value)
      print(f'Imported {_FROM_HF.value} into {_WORKDIR.value}: {restored.model.config}')
    else:
      export_hf(_WORKDIR.value, _TO_HF.value)
      print(f'Exported {_WORKDIR.value} to {_TO_HF.value}')


if __name__ == '__main__':
  app.run(main)
