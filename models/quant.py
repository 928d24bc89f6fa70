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
path"), except where one row of float32 activations meets a matrix with groups of 32
inputs in the one-device decoding layout: there XLA:CPU writes the dequantized float
tile before its dot, so a 4-bit weight costs nearly what an 8-bit one does, and the
trunk calls a CPU kernel instead (models/cpu_kernels/qmatvec.cc through jax.ffi:
kernel_form, matvec) that reads the 4-bit values packed two per byte and dequantizes
in registers; measured in the README section "Quantized weights".
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
  """Whether `value` is a quantized weight (the dict described in the module docstring,
  or its packed kernel form: see kernel_form)."""
  return (isinstance(value, Mapping) and 'scale' in value
          and ('qvalue' in value or 'qpacked' in value))


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


def _unpack(packed: jax.Array) -> jax.Array:
  """Packed nibbles [.., O, I / 2] (kernel_form) -> their values 0 .. 15 as int8 [.., O, I]:
  in each group of 32 values the low nibble of byte j is value j, the high one j + 16."""
  groups = packed.reshape(packed.shape[:-1] + (-1, KERNEL_GROUP // 2))
  values = jnp.concatenate([groups & 15, groups >> 4], -1)
  return values.reshape(packed.shape[:-1] + (-1,)).astype(jnp.int8)


def dequantize(weight: dict, dtype=jnp.float32) -> jax.Array:
  """A quantized weight -> the float weight in `dtype`: qvalue * scale (+ min), each
  broadcast over its tile. The reference every quantized matmul equals."""
  q = (_unpack(weight['qpacked']) if 'qpacked' in weight else weight['qvalue']).astype(dtype)
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
  if tied and kernel_applies(hidden, weight):
    return matvec(hidden, weight).astype(dtype)
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
  if is_quantized(value) and 'qpacked' in value:
    return tuple(value['qpacked'].shape[:-1]) + (2 * value['qpacked'].shape[-1],)
  return tuple((value['qvalue'] if is_quantized(value) else value).shape)


# The CPU kernel's form of a quantized matrix (models/cpu_kernels/qmatvec.cc): one-token
# decoding at batch 1 multiplies a row of activations by an [out, in] matrix; XLA:CPU
# dequantizes the whole matrix into a float tile before its dot (so a 4-bit weight costs
# about what an 8-bit one does), the kernel dequantizes in registers. Measured on SmolLM2's
# 30 blocks of qkv / o / gate-up / down matrix-vector products, 2 cores (README "Quantized
# weights"): 4-bit values dequantize-then-dot 9.4 ms, the kernel on packed nibbles 7.6 ms.
KERNEL_GROUP = GGUF_BLOCK


def kernel_form(weight: Any) -> Any:
  """A quantized [out, in] matrix (groups of KERNEL_GROUP inputs, as GGUF's Q8_0 / Q4_0 /
  Q4_1 and the int4 format have) in the form the CPU kernel reads, or None where it does
  not apply (a float weight, another rank, per-channel scales).

  Values in -8 .. 7 are packed two per byte: {'qpacked': uint8 [out, in / 2] (q + 8 in
  0 .. 15), 'scale': float32, 'min': float32 = min - 8 scale}, so w = q * scale + min with
  q the nibble (half the bytes of int8 storage); other values stay int8 with float32 scale
  and min. Both dequantize (dequantize) to the original weight up to float32 rounding
  (the min is rounded once more). Reads the values (call it outside jit)."""
  if (not is_quantized(weight) or 'qvalue' not in weight or weight['qvalue'].ndim != 2
      or weight['qvalue'].shape[1] % KERNEL_GROUP
      or weight['scale'].shape != (weight['qvalue'].shape[0],
                                   weight['qvalue'].shape[1] // KERNEL_GROUP)):
    return None
  q = np.asarray(weight['qvalue'])
  if q.dtype != np.int8 and not (np.issubdtype(q.dtype, np.integer) and q.min() >= -128
                                 and q.max() <= 127):
    return None
  scale = jnp.asarray(weight['scale'], jnp.float32)
  low = weight.get('min')
  low = None if low is None else jnp.asarray(low, jnp.float32)
  if q.min() >= -8 and q.max() <= 7:
    nibbles = (q.astype(np.int16) + 8).astype(np.uint8).reshape(q.shape[0], -1, 2,
                                                                KERNEL_GROUP // 2)
    packed = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(q.shape[0], -1)
    return {'qpacked': jnp.asarray(packed), 'scale': scale,
            'min': (0 if low is None else low) - 8 * scale}
  out = {'qvalue': jnp.asarray(q.astype(np.int8)), 'scale': scale}
  return out if low is None else {**out, 'min': low}


def kernel_blocks(params: Any) -> bool:
  """Whether a parameter tree's block matrices (params['layers'], stacked [L, ...]) are
  quantized in groups of KERNEL_GROUP inputs, every one: what the decoding layout's
  'rows' orientation holds in kernel_form (models.transformer.decoding_layout)."""
  layers = params.get('layers') if isinstance(params, Mapping) else None
  found = []

  def visit(tree):
    for name, value in tree.items():
      if is_quantized(value) and name in LAYER_WEIGHTS and 'qvalue' in value:
        axis = CONTRACTED[name][1] + 1          # the grouped axis, after 'layers'
        found.append(value['scale'].shape[axis] * KERNEL_GROUP == value['qvalue'].shape[axis])
      elif isinstance(value, Mapping):
        visit(value)
  if isinstance(layers, Mapping):
    visit(layers)
  return bool(found) and all(found)


# The most rows of activations one kernel call takes (qmatvec.cc's kMaxRows): a decoding
# step's token, or a verify call's few (batch 1).
KERNEL_MAX_ROWS = 16


def kernel_applies(x: jax.Array, weight: Any) -> bool:
  """Whether matvec(x, weight) may stand for x @ weight.T: at most KERNEL_MAX_ROWS rows of
  float32 activations (x [.., D]) and a weight in kernel_form with the CPU kernel built."""
  from models import cpu_kernels
  return (is_quantized(weight) and weight['scale'].dtype == jnp.float32
          and weight['scale'].ndim == 2 and x.dtype == jnp.float32
          and int(np.prod(x.shape[:-1])) <= KERNEL_MAX_ROWS
          and x.shape[-1] == weight['scale'].shape[1] * KERNEL_GROUP
          and ('qpacked' in weight or weight['qvalue'].dtype == jnp.int8)
          and cpu_kernels.available())


def matvec(x: jax.Array, weight: dict) -> jax.Array:
  """x [.., D] (at most KERNEL_MAX_ROWS rows, float32) times a kernel_form weight [O, D]:
  [.., O] float32, through the CPU kernel (models/cpu_kernels/qmatvec.cc), which reads
  each weight group once for all rows. Equals x @ dequantize(weight).T to float32
  rounding (tests/test_quant.py). Call only where kernel_applies."""
  from models import cpu_kernels
  packed, low = 'qpacked' in weight, weight.get('min')
  out, rows = weight['scale'].shape[0], int(np.prod(x.shape[:-1]))
  call = jax.ffi.ffi_call(cpu_kernels.TARGETS[(packed, low is not None)],
                          jax.ShapeDtypeStruct((rows, out), jnp.float32),
                          vmap_method='sequential')
  values = weight['qpacked' if packed else 'qvalue']
  low = jnp.zeros((1, 1), jnp.float32) if low is None else low
  return call(x.reshape(rows, -1), values, weight['scale'], low).reshape(
      x.shape[:-1] + (out,))


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
