"""The library behind launch.convert (and launch.compare_hf): Hugging Face directory <->
workdir. The tensor mapping and checks live in training/hf.py."""
import json
import os
import shutil


def import_hf(hf_dir: str, workdir: str, dtype: str = 'float32'):
  """HF directory -> workdir (config.json, tokenizer, parameters-only checkpoint)."""
  import ml_collections
  from configs import ar_lm
  from models import families
  from training import checkpoints, hf
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
  params = hf.load_params(hf_dir, families.transformer_config(config, tokenizer.vocab_size))
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
  from models import Transformer
  if type(restored.model) is not Transformer:  # ar_lm and distilled drafts are plain LMs
    raise ValueError(f'{workdir} holds a {restored.config.family!r} model; only autoregressive '
                     'LMs export to the Llama layout.')
  config = restored.model.config
  if config.mtp_heads > 1:
    print(f'Note: the Llama layout has no place for heads 2..{config.mtp_heads} of this '
          'multi-token prediction model; the export is its next-token model (head 1), '
          'which generates exactly what the MTP model generates.')
  os.makedirs(hf_dir, exist_ok=True)
  tensors = hf.export_tensors(restored.params, config)
  save_file({name: jnp.asarray(value) for name, value in tensors.items()},
            os.path.join(hf_dir, hf.SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf.hf_config(config, restored.tokenizer), f, indent=2)
  if isinstance(restored.tokenizer, tokenizers.HuggingFaceTokenizer):
    # tokenizer.json with a post-processor matching add_bos, tokenizer_config.json and
    # the chat template: transformers then encodes prompts and chats as we do.
    restored.tokenizer.save_hf(hf_dir)
  else:
    print(f'Note: the {type(restored.tokenizer).__name__} of {workdir} has no tokenizer.json '
          'form; the exported model takes the same ids (bos/eos/pad in config.json).')


def _prepare_workdir(workdir: str, overwrite: bool) -> None:
  """Refuses an existing non-empty workdir without overwrite (before anything is read);
  with overwrite, refuses a directory that is not a workdir."""
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f'--workdir {workdir} exists and is not a directory.')
    return
  if not overwrite:
    raise ValueError(f'--workdir {workdir} exists and is not empty; give --overwrite to replace '
                     'it, or a new directory.')
  from training import checkpoints, tokenizers
  if not (os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE))
          or tokenizers.exists(workdir)):
    raise ValueError(f'--workdir {workdir} is not empty and holds no workdir (no '
                     f'{checkpoints.CONFIG_FILE}); not deleting it even with --overwrite.')


def import_gguf(path_or_name: str, workdir: str, dtype: str = 'float32',
                overwrite: bool = False):
  """GGUF file (or a named model: smollm2-135m) -> workdir (config.json, tokenizer,
  parameters-only checkpoint). Every check runs before the workdir is touched."""
  from training import checkpoints, gguf_io
  _prepare_workdir(workdir, overwrite)
  _, config, tokenizer, params = gguf_io.read(path_or_name, dtype)
  if os.path.isdir(workdir) and os.listdir(workdir):
    shutil.rmtree(workdir)   # --overwrite, checked above
  checkpoints.check_and_save_config(workdir, config)
  tokenizer.save(workdir)
  checkpoints.save_params(workdir, params)
  return checkpoints.restore_model(workdir)


def export_gguf(workdir: str, path: str, outtype: str = 'f32') -> None:
  """Workdir -> GGUF file (llama architecture, tokenizer metadata); see training/gguf_io.py."""
  from training import gguf_io
  gguf_io.export(workdir, path, outtype)
