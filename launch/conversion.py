"""The library behind launch.convert (and launch.compare_hf): Hugging Face directory <->
workdir. The tensor mapping and checks live in training/hf.py."""
import json
import os
import shutil


def import_hf(hf_dir: str, workdir: str, dtype: str = 'float32', quantize: str | None = None,
              group_size: int = 32):
  """HF directory -> workdir (config.json, tokenizer, parameters-only checkpoint);
  quantize: int8 | int4 post-training quantization (quantize_params)."""
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
  # The source's context length, which the exports write back (not the training seq_len).
  config.context_length = int(hf_config.get('max_position_embeddings') or 0)
  params = hf.load_params(hf_dir, families.transformer_config(config, tokenizer.vocab_size))
  if quantize:
    params = quantize_params(params, quantize, group_size)
    config.quantization = quantize
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
  from models import quant
  tensors = hf.export_tensors(quant.dequantize_params(restored.params), config)
  save_file({name: jnp.asarray(value) for name, value in tensors.items()},
            os.path.join(hf_dir, hf.SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf.hf_config(config, restored.tokenizer, hf.context_length(restored.config)), f,
              indent=2)
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
                overwrite: bool = False, keep_quantized: bool = False,
                quantize: str | None = None, group_size: int = 32):
  """GGUF file (or a named model: smollm2-135m) -> workdir (config.json, tokenizer,
  parameters-only checkpoint). Every check runs before the workdir is touched.
  keep_quantized: Q8_0 / Q4_0 / Q4_1 tensors stay quantized (training/gguf_io.py; a
  note is printed for each tensor dequantized instead); quantize: post-training
  quantization of the imported model (quantize_params)."""
  from training import checkpoints, gguf_io
  _prepare_workdir(workdir, overwrite)
  notes = []
  _, config, tokenizer, params = gguf_io.read(path_or_name, dtype, keep_quantized, notes)
  for note in notes:
    print(f'Note: {note}')
  if quantize:
    params = quantize_params(params, quantize, group_size)
    config.quantization = quantize
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


def quantize_params(params, fmt: str, group_size: int = 32):
  """Post-training weight-only quantization (models/quant.py: int8 per channel, int4 in
  groups of group_size) of an autoregressive LM's parameters, checked before anything
  is written: ValueError for an unknown format or a group size that does not divide a
  weight's input dimension."""
  from models import quant
  return quant.quantize_params(params, fmt, group_size)


def quantize_workdir(source: str, workdir: str, fmt: str, group_size: int = 32,
                     overwrite: bool = False):
  """A workdir's autoregressive LM -> a new workdir holding it quantized (same config and
  tokenizer; launch.convert --quantize)."""
  from models import Transformer
  from training import checkpoints
  restored = checkpoints.restore_model(source)
  if type(restored.model) is not Transformer:
    raise ValueError(f'{source} holds a {restored.config.family!r} model; only autoregressive '
                     'LMs are quantized.')
  if os.path.abspath(source) == os.path.abspath(workdir):
    raise ValueError('--quantize writes a new workdir; give --from_workdir=SOURCE and another '
                     '--workdir.')
  params = quantize_params(restored.params, fmt, group_size)
  _prepare_workdir(workdir, overwrite)
  if os.path.isdir(workdir) and os.listdir(workdir):
    shutil.rmtree(workdir)   # --overwrite, checked above
  config = restored.config
  config.quantization = fmt
  checkpoints.check_and_save_config(workdir, config)
  restored.tokenizer.save(workdir)
  checkpoints.save_params(workdir, params)
  return checkpoints.restore_model(workdir)
