"""Checkpoints in the Hugging Face layout: import Llama / Mistral / Qwen2 weights into a
workdir, and export our autoregressive LM back.

The layout: `config.json`, `model.safetensors` or shards named by
`model.safetensors.index.json`, and `tokenizer.json`.

Tensor mapping (HF Linear weights are [out, in]; ours are [in, ...] einsum operands):
  model.embed_tokens.weight [V, D]                  -> embedding [V_pad, D] (zero rows pad)
  lm_head.weight [V, D] (absent when tied)          -> lm_head [D, V_pad]
  model.norm.weight                                 -> final_norm.scale
  layers.i.input_layernorm.weight                   -> block_i.attention_norm.scale
  layers.i.post_attention_layernorm.weight          -> block_i.mlp_norm.scale
  layers.i.self_attn.{q,k,v}_proj.weight [N*H, D]   -> attention.{q,k,v} [D, N, H]
  layers.i.self_attn.{q,k,v}_proj.bias [N*H] (Qwen2)-> attention.{q,k,v}_bias [N, H]
  layers.i.self_attn.o_proj.weight [D, N*H]         -> attention.o [N, H, D]
  layers.i.mlp.{gate,up}_proj.weight [F, D]         -> mlp.{gate,up} [D, F]
  layers.i.mlp.down_proj.weight [D, F]              -> mlp.down [F, D]
Rotary embeddings agree without permuting: HF's `rotate_half` pairs the first and
second halves of the head dim, as models/transformer.py does, with the same
frequencies theta^(-2i / H). The layout is written per layer (block_i); load_params
stacks the blocks into the trunk's 'layers' tree (models.transformer.stack_layer_params)
and export_tensors unstacks them.
"""
import json
import logging
import os
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM')
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'


class UnsupportedCheckpointError(ValueError):
  pass


def read_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} has no config.json: not a Hugging Face checkpoint '
                            'directory.')
  with open(path) as f:
    return json.load(f)


def model_config(hf: dict, dtype: str = 'float32') -> dict:
  """Our `model` config block (models.TransformerConfig fields but vocab_size) from a
  Hugging Face config.json, refusing what our trunk does not compute."""
  architectures = hf.get('architectures') or [hf.get('model_type', '?')]
  if architectures[0] not in SUPPORTED:
    raise UnsupportedCheckpointError(
        f'Unsupported architecture {architectures[0]!r}; supported: {", ".join(SUPPORTED)}.')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UnsupportedCheckpointError(f'Unsupported hidden_act {hf["hidden_act"]!r} (SwiGLU '
                                     'needs silu).')
  if hf.get('mlp_bias') or (architectures[0] != 'Qwen2ForCausalLM' and hf.get('attention_bias')):
    raise UnsupportedCheckpointError('Unsupported: biases on the MLP or the attention output.')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  heads = hf['num_attention_heads']
  return dict(
      num_layers=hf['num_hidden_layers'], d_model=hf['hidden_size'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'],
      rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0))),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=architectures[0] == 'Qwen2ForCausalLM',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      dtype=dtype, param_dtype=dtype, **_rope_fields(hf, rope),
      **_window_fields(hf, architectures[0]))


ROPE_SCALINGS = ('default', 'linear', 'dynamic', 'yarn', 'llama3')


def _rope_fields(hf: dict, rope: dict) -> dict:
  """Our rope_* fields (models/rope.py) from rope_parameters / rope_scaling, read as
  transformers reads them; only non-default fields, so unscaled configs are unchanged."""
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in ROPE_SCALINGS:
    raise UnsupportedCheckpointError(f'Unsupported rope scaling {rope_type!r}; supported: '
                                     f'{", ".join(ROPE_SCALINGS)}.')
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor')) or 1.0
  if partial != 1.0:
    raise UnsupportedCheckpointError(f'Unsupported partial_rotary_factor {partial}.')
  if rope_type == 'default':
    return {}
  # transformers: llama3 / yarn take original_max_position_embeddings (a top-level one
  # first), else max_position_embeddings; dynamic always max_position_embeddings.
  max_positions = hf.get('max_position_embeddings')
  original = (hf.get('original_max_position_embeddings')
              or rope.get('original_max_position_embeddings') or max_positions)
  out = dict(rope_type=rope_type, rope_factor=float(rope.get('factor') or 0.0))
  if rope_type == 'dynamic':
    out['rope_original_max'] = int(max_positions or 0)
  elif rope_type in ('llama3', 'yarn'):
    out['rope_original_max'] = int(original or 0)
  if rope_type == 'llama3':
    out.update(rope_low_freq_factor=float(rope['low_freq_factor']),
               rope_high_freq_factor=float(rope['high_freq_factor']))
  elif rope_type == 'yarn':
    from models import rope as rope_lib
    if not out['rope_factor']:
      out['rope_factor'] = max_positions / original
    attention_factor = rope.get('attention_factor')
    if attention_factor is None:
      attention_factor = rope_lib.yarn_attention_factor(
          out['rope_factor'], rope.get('mscale'), rope.get('mscale_all_dim'))
    out.update(rope_beta_fast=float(rope.get('beta_fast') or 32),
               rope_beta_slow=float(rope.get('beta_slow') or 1),
               rope_attention_factor=float(attention_factor),
               rope_truncate=bool(rope.get('truncate', True)))
  if not out['rope_factor'] or (rope_type != 'linear' and not out.get('rope_original_max')):
    raise UnsupportedCheckpointError(f'rope scaling {rope_type!r} without its factor or '
                                     'original context length.')
  return out


def _window_fields(hf: dict, architecture: str) -> dict:
  """sliding_window / window_start_layer: Mistral windows every layer; Qwen2 (with
  use_sliding_window) the layers marked 'sliding_attention' in layer_types, by default
  those from max_window_layers on."""
  if architecture == 'MistralForCausalLM':
    return {'sliding_window': int(hf['sliding_window'])} if hf.get('sliding_window') else {}
  if architecture != 'Qwen2ForCausalLM' or not hf.get('use_sliding_window'):
    return {}
  window, layers = hf.get('sliding_window'), hf['num_hidden_layers']
  types = hf.get('layer_types') or [
      'sliding_attention' if i >= hf.get('max_window_layers', 28) else 'full_attention'
      for i in range(layers)]
  start = next((i for i, t in enumerate(types) if t == 'sliding_attention'), layers)
  if any(t != 'sliding_attention' for t in types[start:]):
    raise UnsupportedCheckpointError('Unsupported: Qwen2 layer_types with full-attention '
                                     'layers after a sliding-window layer.')
  if not window or start >= layers:
    return {}
  return dict(sliding_window=int(window), window_start_layer=start)


def _tensor_reader(directory: str) -> tuple[Callable[[str], np.ndarray], set]:
  """(read(name) -> array, names): tensors are read one at a time from memory-mapped
  safetensors files, so only the tensor being converted is in memory."""
  from safetensors import safe_open
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
  elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
    with safe_open(os.path.join(directory, SINGLE_FILE), framework='flax') as f:
      weight_map = {name: SINGLE_FILE for name in f.keys()}
  else:
    raise FileNotFoundError(f'{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}.')
  for name in sorted(set(weight_map.values())):
    if not os.path.exists(os.path.join(directory, name)):
      raise FileNotFoundError(f'{os.path.join(directory, name)} is missing (named by '
                              f'{INDEX_FILE}).')
  handles = {}

  def read(name: str):
    if name not in weight_map:
      raise KeyError(name)
    file = weight_map[name]
    if file not in handles:
      handles[file] = safe_open(os.path.join(directory, file), framework='flax')
    return handles[file].get_tensor(name)

  return read, set(weight_map)


def _layout(config) -> dict:
  """HF tensor name -> (our param path, HF shape, function HF array -> ours)."""
  c = config
  n, k, h, d, f = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.mlp_dim
  out = {'model.embed_tokens.weight': (('embedding',), (c.vocab_size, d), None),
         'model.norm.weight': (('final_norm', 'scale'), (d,), None)}
  if not c.tie_embeddings:
    out['lm_head.weight'] = (('lm_head',), (c.vocab_size, d), lambda w: w.T)
  for i in range(c.num_layers):
    hf, ours = f'model.layers.{i}.', f'block_{i}'
    out.update({
        hf + 'input_layernorm.weight': ((ours, 'attention_norm', 'scale'), (d,), None),
        hf + 'post_attention_layernorm.weight': ((ours, 'mlp_norm', 'scale'), (d,), None),
        hf + 'self_attn.q_proj.weight': ((ours, 'attention', 'q'), (n * h, d),
                                         lambda w: w.T.reshape(d, n, h)),
        hf + 'self_attn.k_proj.weight': ((ours, 'attention', 'k'), (k * h, d),
                                         lambda w: w.T.reshape(d, k, h)),
        hf + 'self_attn.v_proj.weight': ((ours, 'attention', 'v'), (k * h, d),
                                         lambda w: w.T.reshape(d, k, h)),
        hf + 'self_attn.o_proj.weight': ((ours, 'attention', 'o'), (d, n * h),
                                         lambda w: w.T.reshape(n, h, d)),
        hf + 'mlp.gate_proj.weight': ((ours, 'mlp', 'gate'), (f, d), lambda w: w.T),
        hf + 'mlp.up_proj.weight': ((ours, 'mlp', 'up'), (f, d), lambda w: w.T),
        hf + 'mlp.down_proj.weight': ((ours, 'mlp', 'down'), (d, f), lambda w: w.T),
    })
    if c.qkv_bias:
      for name, heads in (('q', n), ('k', k), ('v', k)):
        out[hf + f'self_attn.{name}_proj.bias'] = ((ours, 'attention', f'{name}_bias'),
                                                   (heads * h,), lambda b, m=heads: b.reshape(m, h))
  return out


def _pad_vocab(array, config, axis: int):
  pad = config.padded_vocab_size - config.vocab_size
  if not pad:
    return array
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, pad)
  import jax.numpy as jnp
  return jnp.pad(array, widths)


def load_params(directory: str, config) -> dict:
  """Our parameter tree for models.Transformer(config) from a HF checkpoint directory,
  cast to config.param_dtype tensor by tensor."""
  import jax.numpy as jnp
  read, names = _tensor_reader(directory)
  dtype = jnp.dtype(config.param_dtype)
  params: dict = {}
  layout = _layout(config)
  missing = [name for name in layout if name not in names]
  if missing:
    raise ValueError(f'{directory} lacks tensors the config needs: {", ".join(missing[:5])}'
                     + (f' and {len(missing) - 5} more' if len(missing) > 5 else ''))
  unused = sorted(n for n in names - set(layout) if not n.endswith('rotary_emb.inv_freq'))
  if unused:
    raise UnsupportedCheckpointError(f'{directory} has tensors our model has no place for: '
                                     f'{", ".join(unused[:5])}')
  for name, (path, shape, convert) in layout.items():
    tensor = read(name)
    if tuple(tensor.shape) != shape:
      raise ValueError(f'Tensor {name} has shape {tuple(tensor.shape)}; config.json implies '
                       f'{shape}.')
    value = (convert(tensor) if convert else tensor).astype(dtype)
    if path == ('embedding',):
      value = _pad_vocab(value, config, 0)
    elif path == ('lm_head',):
      value = _pad_vocab(value, config, 1)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  from models import transformer
  return transformer.stack_layer_params(params)


def export_tensors(params, config) -> dict:
  """The inverse of load_params: {HF name: array [out, in] layout}, vocab padding cut."""
  from models import transformer
  params = transformer.unstack_layer_params(params)
  out = {}
  for name, (path, shape, _) in _layout(config).items():
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value)
    if path == ('embedding',):
      value = value[:config.vocab_size]
    elif path == ('lm_head',):
      value = value[:, :config.vocab_size].T
    elif path[-1] in ('q', 'k', 'v'):
      value = value.reshape(value.shape[0], -1).T
    elif path[-1] == 'o':
      value = value.reshape(-1, value.shape[-1]).T
    elif path[-1] in ('gate', 'up', 'down'):
      value = value.T
    elif path[-1].endswith('_bias'):
      value = value.reshape(-1)
    assert value.shape == shape, (name, value.shape, shape)
    out[name] = np.ascontiguousarray(value)
  return out


def context_length(experiment_config) -> int:
  """The context length an export declares: the imported source's (max_position_embeddings
  / GGUF context_length, kept as config.context_length), else 4096 for models trained here
  (their training seq_len is the length of a training chunk, not a limit on positions)."""
  return int(experiment_config.get('context_length', 0) or 4096)


def hf_config(config, tokenizer, context: int = 4096) -> dict:
  """config.json of the exported model: Qwen2 when it has q/k/v biases, else Llama.
  context: its max_position_embeddings (context_length)."""
  qwen = config.qkv_bias
  eos = list(tokenizer.eos_ids)
  window = config.sliding_window
  if window and not qwen and config.window_start_layer:
    raise ValueError('A sliding window on only some layers has a Hugging Face layout only '
                     'for Qwen2 (q/k/v biases).')
  arch, kind = (('Qwen2ForCausalLM', 'qwen2') if qwen else
                ('MistralForCausalLM', 'mistral') if window else ('LlamaForCausalLM', 'llama'))
  return {
      'architectures': [arch],
      'model_type': kind,
      'vocab_size': config.vocab_size, 'hidden_size': config.d_model,
      'intermediate_size': config.mlp_dim, 'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_theta,
      'rope_parameters': _export_rope(config),
      'tie_word_embeddings': config.tie_embeddings, 'attention_bias': False, 'mlp_bias': False,
      'max_position_embeddings': (config.rope_original_max if config.rope_type == 'dynamic'
                                  else context), 'torch_dtype': config.param_dtype,
      'bos_token_id': tokenizer.bos_id, 'eos_token_id': eos[0] if len(eos) == 1 else eos,
      'pad_token_id': tokenizer.pad_id,
      **({} if not window else
         {'sliding_window': window} if not qwen else
         {'use_sliding_window': True, 'sliding_window': window,
          'max_window_layers': config.window_start_layer}),
  }


def _export_rope(config) -> dict:
  """rope_parameters of config.json: the inverse of _rope_fields."""
  c, out = config, {'rope_type': config.rope_type, 'rope_theta': config.rope_theta}
  if c.rope_type != 'default':
    out['factor'] = c.rope_factor
  if c.rope_type == 'llama3':
    out.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
               original_max_position_embeddings=c.rope_original_max)
  elif c.rope_type == 'yarn':
    out.update(original_max_position_embeddings=c.rope_original_max,
               beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow,
               attention_factor=c.rope_attention_factor, truncate=c.rope_truncate)
  return out


def _optional_json(directory: str, name: str) -> dict:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _ids(value) -> list[int]:
  return [] if value is None else [int(i) for i in (value if isinstance(value, list) else [value])]


def _token_text(value) -> str | None:
  """A tokenizer_config.json token: a string or an AddedToken dict {"content": ...}."""
  return value.get('content') if isinstance(value, dict) else value


def read_chat_template(directory: str, tokenizer_config: dict) -> str | None:
  """The chat template as transformers finds it: chat_template.jinja first, then
  tokenizer_config.json's `chat_template` (a string, or named templates: 'default')."""
  path = os.path.join(directory, 'chat_template.jinja')
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  template = tokenizer_config.get('chat_template')
  if template is None:
    template = _optional_json(directory, 'chat_template.json').get('chat_template')
  if isinstance(template, list):
    named = {t.get('name'): t.get('template') for t in template}
    if 'default' not in named:
      log.warning('The checkpoint has chat templates %s but none named "default"; none is '
                  'imported.', sorted(named))
    return named.get('default')
  return template


def read_tokenizer(directory: str, hf: dict, vocab_size: int):
  """The model's tokenizer: tokenizer.json, the special ids, whether a prompt starts with
  BOS, every stop id and the chat template.

  BOS: tokenizer_config.json's add_bos_token where it is given (transformers 4's Llama
  tokenizers rebuild the post-processor from it), else tokenizer.json's post-processor
  (what encoding with special tokens adds), never config.json's bos_token_id alone.
  Stop ids: the union of eos_token_id in config.json and generation_config.json (a list
  there names end-of-turn tokens too, e.g. Llama-3's <|eot_id|>) and tokenizer_config.json's
  eos_token (chat models' end-of-turn, e.g. <|im_end|>); GGUF imports union eos, eot and
  eom ids the same way (training/gguf_io.py).
  """
  from training import tokenizers
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} has no tokenizer.json (the tokenizers-library file '
                            'saved with the model).')
  with open(path) as f:
    tokenizer_json = f.read()
  tokenizer_config = _optional_json(directory, 'tokenizer_config.json')
  generation = _optional_json(directory, 'generation_config.json')
  import tokenizers as tokenizers_lib
  backend = tokenizers_lib.Tokenizer.from_str(tokenizer_json)

  def token_id(name):
    text = _token_text(tokenizer_config.get(name))
    return None if text is None else backend.token_to_id(text)

  # Every file that can declare one; config.json's first stays eos_id (the template's).
  eos = _ids(hf.get('eos_token_id')) + _ids(generation.get('eos_token_id'))
  if token_id('eos_token') is not None:
    eos.append(token_id('eos_token'))
  bos = hf.get('bos_token_id', generation.get('bos_token_id'))
  if bos is None:
    bos = token_id('bos_token')
  before, after = tokenizers.special_tokens_added(tokenizer_json)
  if len(before) > 1:
    raise UnsupportedCheckpointError(f'The tokenizer adds {len(before)} tokens before a '
                                     'prompt; only a single BOS is supported.')
  add_bos = tokenizer_config.get('add_bos_token')
  if add_bos is None:
    add_bos = bool(before)
    if before and before[0] != bos:
      log.warning('The tokenizer starts prompts with id %d; config.json names bos %s. '
                  'Using %d.', before[0], bos, before[0])
      bos = before[0]
  elif bool(add_bos) != bool(before):
    log.warning('tokenizer_config.json says add_bos_token=%s but tokenizer.json\'s '
                'post-processor %s; following add_bos_token (transformers 5 follows the '
                'post-processor).', add_bos, 'adds one' if before else 'adds none')
  if after:
    log.warning('The tokenizer appends %s to every encoded text; prompts are encoded '
                'without it (a prompt ending in EOS has nothing to continue).', after)
  return tokenizers.HuggingFaceTokenizer(
      tokenizer_json, vocab_size, bos, eos, hf.get('pad_token_id'), add_bos=bool(add_bos),
      chat_template=read_chat_template(directory, tokenizer_config))
