"""Weight-only quantization: the one home of quantized weights (issue #18).

A quantized weight is a plain dict pytree that stands where the float weight stood in
the parameter tree, so it flows through the layer scan (every field keeps the leading
'layers' axis and is sliced with it), the checkpoints (orbax saves the int8 arrays)
and the decoding drivers unchanged:

  {'qvalue': int8 array of the float weight's shape (4-bit formats: values -8 .. 7, held
             in bytes: see compute_form),
   'scale':  float array of the same rank; each dimension divides the weight's (a
             "tiled" scale as in qwix's QArray: per output channel = size 1 on the
             contracted axes, grouped = weight dim / group size on the grouped axis),
   'min':    optional float array shaped like scale (an additive offset per group:
             GGUF Q4_1's m)}

  weight = qvalue * broadcast(scale) [+ broadcast(min)]

Formats (FORMATS):
  int8  per-output-channel symmetric int8 (scale = absmax / 127.5 over the contracted axes)
  int4  symmetric int4 in groups of `group` input features (scale = absmax / 7.5 per group)
  q8_0  GGUF Q8_0: int8 in blocks of 32 inputs, float16 scale d; w = d q
  q4_0  GGUF Q4_0: 4-bit in blocks of 32, float16 d; w = d (q - 8), q in 0..15
  q4_1  GGUF Q4_1: 4-bit in blocks of 32, float16 d and m; w = d q + m, q in 0..15,
        kept as qvalue = q - 8 (-8 .. 7) and min = m + 8 d (exact: both sides round the
        same real number once in float32)

The quantization itself (absmax calibration, int rounding, tiled scales) is qwix's
(google/qwix, `qwix.quantize`, the library MaxText and Tunix use); the GGUF formats are
read from the file's blocks (training/gguf_io.py). The matmul is dequantize-then-matmul
inside the jitted step (qwix's own choice for float activations, `dot_general`'s "slow
path": XLA fuses the int -> float convert and the scale into the dot's operand, so the
weights stream from memory at their stored width; measured in the README section
"Quantized weights").
"""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ('int8', 'int4', 'q8_0', 'q4_0', 'q4_1')
GGUF_BLOCK = 32       # the block (group) size of GGUF's Q8_0 / Q4_0 / Q4_1

# Which axes of each weight are contracted by the trunk's einsums (the per-layer shape,
# without the leading 'layers' axis), and which of them a group runs along (GGUF's
# blocks run along the input features of the Hugging Face [out, in] matrix).
#   name: (contracted axes, grouped axis)
CONTRACTED = {
    'q': ((0,), 0), 'k': ((0,), 0), 'v': ((0,), 0),        # [D, N, H], [D, K, H]
    'o': ((0, 1), 1),                                       # [N, H, D]: groups along H
    'gate': ((0,), 0), 'up': ((0,), 0), 'down': ((0,), 0),  # [D, F], [F, D]
    'embedding': ((1,), 1),                                 # [V, D] (tied LM head)
    'lm_head': ((0,), 0),                                   # [D, V]
}
# The trunk's matrices: what --quantize converts (the embedding and LM head with
# include_embedding, the norms and biases never).
LAYER_WEIGHTS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def is_quantized(value: Any) -> bool:
  """Whether `value` is a quantized weight (the dict described in the module docstring)."""
  return isinstance(value, Mapping) and 'qvalue' in value and 'scale' in value


def contains_quantized(tree: Any) -> bool:
  """Whether any node of the parameter tree `tree` is a quantized weight."""
  if is_quantized(tree):
    return True
  if isinstance(tree, Mapping):
    return any(contains_quantized(v) for v in tree.values())
  return False


def _broadcast(small: jax.Array, shape: tuple) -> jax.Array:
  """A tiled scale / min [.., s_i, ..] (s_i divides n_i) -> [.., n_i, ..]: element j of
  axis i reads entry j // (n_i / s_i). A reshape and a broadcast (no gather), which XLA
  fuses into the consumer."""
  split, target = [], []
  for n, s in zip(shape, small.shape):
    split += [s, 1]
    target += [s, n // s]
  return jnp.broadcast_to(small.reshape(split), target).reshape(shape)


def dequantize(weight: dict, dtype=jnp.float32) -> jax.Array:
  """A quantized weight -> the float weight in `dtype`: qvalue * scale (+ min), each
  broadcast over its tile. The reference every quantized matmul equals."""
  q = weight['qvalue'].astype(dtype)
  out = q * _broadcast(weight['scale'].astype(dtype), q.shape)
  if weight.get('min') is not None:
    out = out + _broadcast(weight['min'].astype(dtype), q.shape)
  return out


def as_float(weight: Any, dtype) -> jax.Array:
  """A parameter (float array or quantized weight) as a float array in `dtype`: what the
  trunk's einsums read (dequantize-then-matmul, fused by XLA into the dot)."""
  if is_quantized(weight):
    return dequantize(weight, jnp.float32).astype(dtype)
  return weight.astype(dtype)


# The LM head's dequantized tile per chunk of vocabulary rows (2048 x 576 float32 = 4.7 MB
# for SmolLM2): dequantizing the whole [V, D] matrix at once writes and reads 113 MB per
# decode step and ran the int8 head at 12.7 ms/token vs 4.7 ms float32; in chunks of 2048
# rows it took 5.5 ms (a 20-step fori_loop, SmolLM2's shapes, this CPU).
HEAD_CHUNK = 2048


def head_logits(hidden: jax.Array, weight: Any, tied: bool, dtype) -> jax.Array:
  """[B, T, D] hidden -> [B, T, V] logits (activation dtype) through the LM head `weight`
  ([V, D] embedding when tied, else [D, V]). A quantized head is dequantized and
  multiplied in chunks of vocabulary rows (a lax.map), so no [V, D] float copy is made."""
  spec = 'BTD,VD->BTV' if tied else 'BTD,DV->BTV'
  vocab_axis = 0 if tied else 1
  vocab = logical_shape(weight)[vocab_axis]
  chunk = next((c for c in range(min(HEAD_CHUNK, vocab), 0, -1) if vocab % c == 0), vocab)
  if not is_quantized(weight) or chunk == vocab:
    return jnp.einsum(spec, hidden, as_float(weight, dtype))

  def split(x):   # [.., V, ..] -> [V / chunk, .., chunk, ..]
    if x.shape[vocab_axis] == 1:
      return jnp.broadcast_to(x[None], (vocab // chunk,) + x.shape)
    shape = list(x.shape)
    shape[vocab_axis:vocab_axis + 1] = [vocab // chunk, chunk]
    return jnp.moveaxis(x.reshape(shape), vocab_axis, 0)
  parts = jax.lax.map(lambda w: jnp.einsum(spec, hidden, as_float(w, dtype)),
                      {k: split(v) for k, v in weight.items()})        # [V / chunk, B, T, chunk]
  return jnp.moveaxis(parts, 0, 2).reshape(hidden.shape[:2] + (vocab,))


def take_rows(weight: Any, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of a [V, D] matrix (the embedding lookup) in `dtype`; a quantized
  embedding gathers its int rows and their scales, never the whole matrix."""
  if not is_quantized(weight):
    return jnp.take(weight, ids, axis=0).astype(dtype)
  rows = {k: jnp.take(v, ids, axis=0) for k, v in weight.items()}
  return dequantize(rows, jnp.float32).astype(dtype)


def logical_shape(value: Any) -> tuple:
  """The float weight's shape of a parameter, quantized or not."""
  return tuple((value['qvalue'] if is_quantized(value) else value).shape)


def _axes_of(name: str, ndim: int) -> tuple[tuple[int, ...], int]:
  """(contracted axes, grouped axis) of weight `name` with `ndim - rank` leading
  (stacked 'layers') axes."""
  contracted, grouped = CONTRACTED[name]
  lead = ndim - (3 if name in ('q', 'k', 'v', 'o') else 2)
  return tuple(a + lead for a in contracted), grouped + lead


def quantize(weight: jax.Array, name: str, fmt: str, group: int = GGUF_BLOCK,
             scale_dtype=jnp.float32) -> dict:
  """A float weight (our layout, leading stacked axes allowed) -> a quantized weight.

  fmt: 'int8' (per output channel) or 'int4' (groups of `group` along the input axis of
  CONTRACTED[name]). Calibration, rounding and scale shapes are qwix.quantize's (absmax,
  symmetric with qwix's bound qmax + 0.5: int8 scale = absmax / 127.5, int4 = absmax /
  7.5, so the largest magnitude rounds to -128 / -8 or clips to 127 / 7, every weight
  within half a step; an all-zero channel dequantizes to 0).
  Raises ValueError for another format, a name with no known layout, or a group size
  that does not divide the grouped dimension.
  """
  import qwix
  if fmt not in ('int8', 'int4'):
    raise ValueError(f'Cannot post-training quantize to {fmt!r}; expected int8 or int4 '
                     f'(the GGUF formats {", ".join(FORMATS[2:])} come only from GGUF files).')
  if name not in CONTRACTED:
    raise ValueError(f'No quantization layout for parameter {name!r}; expected one of '
                     f'{", ".join(CONTRACTED)}.')
  contracted, grouped = _axes_of(name, weight.ndim)
  channels = [a for a in range(weight.ndim) if a not in contracted]
  tiled = {}
  if fmt == 'int4':
    if group <= 0 or weight.shape[grouped] % group:
      raise ValueError(f'Group size {group} does not divide dimension {weight.shape[grouped]} '
                       f'of {name} {tuple(weight.shape)}.')
    tiled = {grouped: group}
    contracted = tuple(a for a in contracted if a != grouped)
    # The other contracted axis of 'o' (heads) is channel-wise: a group never spans heads.
    channels = channels + list(contracted)
  qtype = jnp.int8 if fmt == 'int8' else jnp.int4
  qarray = qwix.quantize(jnp.asarray(weight, jnp.float32), qtype, channelwise_axes=channels,
                         tiled_axes=tiled, scale_dtype=scale_dtype)
  return compute_form({'qvalue': qarray.qvalue, 'scale': qarray.scale})


def quantize_params(params: dict, fmt: str, group: int = GGUF_BLOCK,
                    include_embedding: bool = True) -> dict:
  """Post-training quantization of a Transformer's parameter tree: every attention and
  MLP matrix (stacked blocks and MTP heads) and, with include_embedding, the embedding
  and LM head become quantized weights; norms and biases stay float. Already-quantized
  weights are kept. Raises ValueError as `quantize` does (before anything is returned)."""
  def convert(tree, inside_block):
    out = {}
    for key, value in tree.items():
      if is_quantized(value):
        out[key] = value
      elif isinstance(value, dict):
        out[key] = convert(value, inside_block or key in ('layers', 'future'))
      elif ((inside_block and key in LAYER_WEIGHTS)
            or (include_embedding and not inside_block and key in ('embedding', 'lm_head'))):
        out[key] = quantize(value, key, fmt, group)
      else:
        out[key] = value
    return out
  return convert(params, False)


def compute_form(params: Any) -> Any:
  """4-bit values held as int8 (qwix.quantize returns int4; so may older checkpoints):
  what the trunk decodes from and checkpoints store. Two reasons, both measured on this
  CPU (README "Quantized weights"): XLA:CPU converts packed int4 to float ~2.2x slower
  than int8 (a 30-layer SmolLM2-shaped matvec stack: 19.4 ms int4 vs 8.8 ms int8 vs
  22.4 ms float32), and arrays restored as int4 carry a byte-per-element layout that an
  AOT-compiled program (launch.generation) refuses ("Passed layout ...
  sub_byte_element_size_in_bits=0"). The values (-8 .. 7) are unchanged."""
  int4 = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(np.int8))
                      if jnp.dtype(x.dtype) in int4 else x, params)


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
  """Every quantized weight of a parameter tree dequantized (float `dtype`); other
  leaves unchanged. What the exporters (Hugging Face, GGUF) write."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


def weight_bytes(params: Any) -> int:
  """Bytes of every parameter as stored (int4 counted as half a byte): what one decode
  step at batch 1 streams from memory."""
  total = 0
  for leaf in jax.tree.leaves(params):
    dtype = jnp.dtype(leaf.dtype)
    bits = 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dtype.itemsize * 8
    total += int(np.prod(leaf.shape)) * bits // 8
  return total
