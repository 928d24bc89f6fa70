"""The Llama-style transformer trunk and the autoregressive LM.

Axis letters used in shapes and einsums:
  B batch, T query length, S key length (cache capacity when a cache is used),
  L layers, N query heads, K kv heads, G query heads per kv head (N = K * G),
  H head dim, D model dim, F mlp hidden dim, V padded vocabulary.

The module is pure: tokens, positions, the attention mask and the KV cache are
all arguments, and the new cache is a result. Parameters carry logical axis
names (see models/sharding.py) so a mesh rule table decides their layout.

Speed on CPU (issue #17, measured with launch/trunk_cost.py): the blocks are one
lax.scan over parameters stacked on a 'layers' axis (one block body to compile, not
L); the cache [L, B, K, S, H] is the scan's carry, written at the layer index by a
scatter that XLA performs in place inside a decoding while_loop; cached attention
reads only the slot prefix the mask can reach (attention_windows), so a step costs
what its context needs, not what the capacity holds. A one-device CPU decode reads the
block weights in the decoding layout (decoding_layout: fused q/k/v and gate/up products,
each block's weights in their own buffers, so the scan reads them in place).
"""
import dataclasses
import functools
import re
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import masks, quant, rope
from models.kv_cache import KVCache

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static shape of the trunk. Hashable, so it can be a static jit argument."""
  vocab_size: int              # tokenizer vocabulary; logits are padded to vocab_multiple
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 2        # grouped-query attention: num_heads % num_kv_heads == 0
  head_dim: int = 16
  mlp_dim: int = 192           # SwiGLU hidden width
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  qkv_bias: bool = False
  dtype: str = 'float32'       # activation dtype: float32 | bfloat16
  param_dtype: str = 'float32'
  norm_eps: float = 1e-6
  vocab_multiple: int = 128    # pad the logits so the vocab axis shards evenly
  mtp_heads: int = 1           # multi-token prediction: output heads, head i predicting
                               # token t + i (1 = a plain next-token LM)
  # Rotary scaling of imported checkpoints, as transformers computes it (models/rope.py).
  # 'default' leaves the rotary embedding exactly as without these fields.
  rope_type: str = 'default'   # default | linear | dynamic | yarn | llama3
  rope_factor: float = 1.0     # linear, dynamic, yarn, llama3
  rope_original_max: int = 0   # the original context: original_max_position_embeddings
                               # (llama3, yarn), max_position_embeddings (dynamic)
  rope_low_freq_factor: float = 1.0    # llama3
  rope_high_freq_factor: float = 4.0   # llama3
  rope_beta_fast: float = 32.0         # yarn
  rope_beta_slow: float = 1.0          # yarn
  rope_attention_factor: float = 0.0   # yarn: cos/sin factor; 0 = 0.1 ln(factor) + 1
  rope_truncate: bool = True           # yarn: floor/ceil the correction range
  # Sliding-window attention (Mistral; Qwen2 from layer max_window_layers on): a query at
  # position p sees keys at positions > p - sliding_window. 0 = full attention.
  sliding_window: int = 0
  window_start_layer: int = 0  # layers (and MTP heads) from this index on use the window
  # Early exit (the early_exit family; CALM, Schuster et al. 2022; LayerSkip, Elhoushi et
  # al. 2024): exit E reads block E - 1's output with the LM head, 1 <= E < num_layers,
  # increasing; the last block is always the final exit. exit_norm: each exit has its own
  # RMSNorm scale (params['exit_norms'] [E, D]) instead of sharing the final norm.
  exit_layers: tuple[int, ...] = ()
  exit_norm: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}.')
    if self.mtp_heads < 1:
      raise ValueError(f'mtp_heads={self.mtp_heads}; a model needs at least one output head.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f'{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}.')
    if self.rope_type not in rope.ROPE_TYPES:
      raise ValueError(f'rope_type={self.rope_type!r}; expected one of '
                       f'{", ".join(rope.ROPE_TYPES)}.')
    if self.rope_type in ('dynamic', 'yarn', 'llama3') and self.rope_original_max <= 0:
      raise ValueError(f'rope_type={self.rope_type!r} needs rope_original_max > 0 (the '
                       'original context length).')
    if self.sliding_window < 0:
      raise ValueError(f'sliding_window={self.sliding_window}; expected >= 0 (0 = none).')
    # A config read back from JSON holds a list: a tuple keeps the config hashable.
    object.__setattr__(self, 'exit_layers', tuple(int(e) for e in self.exit_layers))
    for e in self.exit_layers:
      if not 1 <= e < self.num_layers:
        raise ValueError(f'exit layer {e} is outside [1, {self.num_layers}) for this '
                         f'{self.num_layers}-layer model.')
    if list(self.exit_layers) != sorted(set(self.exit_layers)):
      raise ValueError(f'exit_layers={self.exit_layers} must be increasing and distinct.')
    if self.exit_layers and self.mtp_heads > 1:
      raise ValueError('An early-exit model has one output head (mtp_heads=1).')

  def windowed(self, layer: int) -> bool:
    """Whether attention layer `layer` (MTP heads count after the blocks) is windowed."""
    return self.sliding_window > 0 and layer >= self.window_start_layer

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_multiple
    return (self.vocab_size + m - 1) // m * m

  @property
  def activation_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def cache_layers(self) -> int:
    """Attention layers holding KV: the blocks plus the extra heads' blocks."""
    return self.num_layers + self.mtp_heads - 1


@flax.struct.dataclass
class ForwardOutput:
  logits: jax.Array               # [B, T, V] float32 (V = padded vocab)
  hidden: jax.Array               # [B, T, D] final hidden states (after the final norm)
  cache: Optional[KVCache]        # the updated cache, None when called without one
  layer_hidden: Optional[tuple] = None  # L x [B, T, D] block outputs, when requested
  future_logits: Optional[jax.Array] = None  # [B, T, n - 1, V] float32 heads 2 .. n of a
                                             # multi-token prediction model (t + 2 .. t + n)


def _init(stddev: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _param(module: nn.Module, name: str, init, *args):
  """module.param(name, init, *args), or the stored tree as it is when it holds quantized
  weights (models/quant.py) or the decoding layout's weights (decoding_layout): their
  arrays have other shapes than the float initializer's, which flax's shape check would
  refuse."""
  if module.has_variable('params', name):
    value = module.get_variable('params', name)
    if quant.contains_quantized(value) or _in_decoding_layout(value):
      return value
  return module.param(name, init, *args)


# The decoding layout (issue #17): how a one-device CPU decode holds the block weights.
#
# Inside the layer scan XLA:CPU copies each block's weight out of the stacked [L, ...]
# array (a dynamic-slice) before the matrix-vector product, so at batch 1 the weights
# cross memory about three times instead of once; and its matrix-vector product streams
# a large [out, in] matrix faster than the same matrix stored [in, out]. Measured on this
# 2-core CPU (notes in README "Where the gap to llama.cpp is"): 60 [576, 1536] matvecs
# 32 GB/s stacked vs 42 GB/s from separate buffers; separate buffers [in, out] vs
# [out, in]: 38 vs 44 GB/s ([576, 1536]), 36 vs 48 ([576, 3072]), 36 vs 45 ([1536, 576]),
# but 35 vs 28 for the square [576, 576]. So decoding_layout holds each block's q, k, v as
# one [E, D] matrix (E = (N + 2K) H), gate and up as one [2F, D], down as [D, F] and o as
# it is ([N, H, D]), every block's in its own buffer (PerLayer); inside the scan block i
# sees a LayerWeight, which `project` multiplies through a lax.switch whose branch j
# reads buffer j (no copy). Fewer, larger products also pay XLA's per-dot overhead fewer
# times (7 -> 4 per block). The switch compiles L branches per product, each one dot.


@jax.tree_util.register_pytree_node_class
class PerLayer:
  """A block weight in the decoding layout: L arrays (or quantized weights), one per
  block, each its own buffer; `transposed`: stored [in, out] where the trunk's product
  names it [out, in] (the 'columns' orientation). A pytree node whose leaves are the
  arrays."""

  def __init__(self, arrays, transposed: bool = False):
    self.arrays, self.transposed = tuple(arrays), transposed

  def tree_flatten(self):
    return self.arrays, self.transposed

  @classmethod
  def tree_unflatten(cls, transposed, arrays):
    return cls(arrays, transposed)


@jax.tree_util.register_pytree_node_class
class LayerWeight:
  """Block `index`'s weight of a PerLayer (index: a traced int32 scalar, the layer scan's
  block; transposed as the PerLayer's): what a block inside the scan holds in place of
  its weight; read by `project`."""

  def __init__(self, arrays, index, transposed: bool = False):
    self.arrays, self.index, self.transposed = tuple(arrays), index, transposed

  def tree_flatten(self):
    return (self.arrays, self.index), self.transposed

  @classmethod
  def tree_unflatten(cls, transposed, children):
    return cls(*children, transposed)


def _in_decoding_layout(tree) -> bool:
  """Whether a parameter tree holds decoding-layout weights (PerLayer / LayerWeight)."""
  if isinstance(tree, (PerLayer, LayerWeight)):
    return True
  return hasattr(tree, 'values') and any(_in_decoding_layout(v) for v in tree.values())


def project(spec: str, x: jax.Array, weight, dtype) -> jax.Array:
  """jnp.einsum(spec, x, weight) in `dtype`, the one product of the trunk with a block
  weight: a float array, a quantized weight (models/quant.py, dequantize-then-matmul) or
  a LayerWeight (a lax.switch over the blocks whose branch j multiplies by block j's own
  buffer, so the weight is read in place; a transposed one, stored [in, out] where the
  spec names a 2-D weight [out, in], is multiplied as stored). A LayerWeight stored as
  the spec's [out, in] in the quantized kernel form (decoding_layout 'rows'), times one
  row of float32 activations, goes through the CPU kernel (quant.matvec)."""
  operands, result = spec.split('->')
  x_axes, w_axes = operands.split(',')
  layer = isinstance(weight, LayerWeight)
  if layer and weight.transposed:
    spec = f'{x_axes},{w_axes[::-1]}->{result}'
  if layer and len(w_axes) == 3 and len(quant.logical_shape(weight.arrays[0])) == 2:
    # o [N, H, D] held as its [D, N H] matrix (_for_the_kernel): x's N, H flattened.
    x = x.reshape(x.shape[:-2] + (-1,))
    x_axes = x_axes[:-1]
    w_axes = result[-1] + x_axes[-1]
    spec = f'{x_axes},{w_axes}->{result}'
  out_in = (layer and not weight.transposed and len(w_axes) == 2
            and w_axes == result[-1] + x_axes[-1])

  def product(w, x):
    if out_in and quant.kernel_applies(x, w):
      return quant.matvec(x, w).astype(dtype)
    return jnp.einsum(spec, x, quant.as_float(w, dtype))
  if layer:
    return jax.lax.switch(weight.index, [functools.partial(product, w) for w in weight.arrays],
                          x)
  return product(weight, x)


def _fields(fn, weights: list):
  """fn over the arrays of same-kind weights: float arrays, or each field of quantized
  weights (qvalue, scale, min)."""
  if quant.is_quantized(weights[0]):
    return {key: None if weights[0][key] is None else fn(*(w[key] for w in weights))
            for key in weights[0]}
  return fn(*weights)


def _kind(weight) -> tuple:
  """What must agree for weights to be fused into one product: float dtype, or the
  quantized fields' dtypes and their sizes along the contracted (first per-block) axis."""
  parts = weight.items() if quant.is_quantized(weight) else (('', weight),)
  return tuple((key, str(v.dtype), v.shape[1]) for key, v in parts if v is not None)


def _per_layer(weight, transposed: bool = False) -> PerLayer:
  """A stacked weight [L, ...] (or quantized weight) -> PerLayer of its L blocks, each
  copied into its own buffer."""
  count = jax.tree.leaves(weight)[0].shape[0]
  return PerLayer([jax.tree.map(lambda a, i=i: jnp.array(a[i]), weight) for i in range(count)],
                  transposed)


def _stacked_part(tree):
  """A block-parameter tree without its PerLayer weights: what the layer scan slices."""
  if hasattr(tree, 'items'):
    return {k: _stacked_part(v) for k, v in tree.items() if not isinstance(v, PerLayer)}
  return tree


def _block_view(sliced, tree, index):
  """One block's parameters: `sliced` (its slice of the stacked leaves of `tree`) with
  every PerLayer of `tree` as its LayerWeight at block `index`."""
  if not hasattr(tree, 'items'):
    return sliced
  return {k: LayerWeight(v.arrays, index, v.transposed) if isinstance(v, PerLayer)
          else _block_view(sliced[k], v, index) for k, v in tree.items()}


# The two orientations of the decoding layout's fused matrices: 'rows' [out, in] for
# one-token calls (XLA:CPU's matrix-vector product streams rows fastest), 'columns'
# [in, out] for calls of 2 or more tokens (its matrix-matrix path, YNNPACK, is 1.3-1.9x
# faster on [in, out] at T = 2-16 on SmolLM2's shapes; README "Where the gap to
# llama.cpp is").
ORIENTATIONS = ('rows', 'columns')


def decoding_layout(params: dict, orientation: str = 'rows') -> dict:
  """The decoding layout of a trunk's parameters (the notes above PerLayer).

  params: the unboxed parameters of a Transformer (or a family reusing the trunk), the
  blocks stacked in params['layers'] (leaves [L, ...]). Returns a new tree in which
  params['layers']['attention'] holds 'qkv' [E, D] per block (E = (N + 2K) H; with
  biases a stacked 'qkv_bias' [L, E]) and 'o', params['layers']['mlp'] holds 'gate_up'
  [2F, D] and 'down' [D, F] per block, all PerLayer; quantized weights are rearranged
  field by field (their groups stay on the input axis). orientation (ORIENTATIONS):
  'rows' stores qkv, gate_up and down as just written ([out, in]: what one-token calls
  read fastest), 'columns' stores them [in, out] (D, E / D, 2F / F, D: what calls of
  several tokens read fastest); o is [N, H, D] in both. A group whose weights differ in
  kind (float and quantized, or two formats: a GGUF file may mix them) keeps its
  separate weights, each PerLayer in its stored orientation. Norms, embedding, LM head
  and an MTP model's 'future' blocks are shared with `params` unchanged. The forward
  computes the same function (float32 sums in another order: logits agree to rounding).
  A tree already in the layout, or without 'layers', is returned as it is.

  Memory: a second copy of the block weights while `params` lives. For one-device
  decoding (launch.generation.decoding_params decides); the stacked layout is what
  training, checkpoints, exporters and sharded meshes use.
  """
  if orientation not in ORIENTATIONS:
    raise ValueError(f'orientation={orientation!r}; expected one of {", ".join(ORIENTATIONS)}.')
  layers = params.get('layers')
  if layers is None or _in_decoding_layout(layers):
    return params
  columns = orientation == 'columns'
  oriented = (lambda w: w) if columns else (lambda w: w.swapaxes(1, 2))   # from [L, in, out]
  attention, mlp = dict(layers['attention']), dict(layers['mlp'])
  qkv = [attention.pop(name) for name in ('q', 'k', 'v')]
  if len({_kind(w) for w in qkv}) == 1:
    attention['qkv'] = _per_layer(_fields(
        lambda *ws: oriented(jnp.concatenate([w.reshape(w.shape[:2] + (-1,)) for w in ws],
                                             -1)), qkv), columns)
    if 'q_bias' in attention:
      count = jax.tree.leaves(qkv[0])[0].shape[0]
      attention['qkv_bias'] = jnp.concatenate(
          [attention.pop(f'{n}_bias').reshape(count, -1) for n in ('q', 'k', 'v')], -1)
  else:
    attention.update({name: _per_layer(w) for name, w in zip('qkv', qkv)})
  attention['o'] = _per_layer(attention['o'])
  gate, up = mlp.pop('gate'), mlp.pop('up')
  if _kind(gate) == _kind(up):
    mlp['gate_up'] = _per_layer(_fields(
        lambda g, u: oriented(jnp.concatenate([g, u], -1)), [gate, up]), columns)
    mlp['down'] = _per_layer(_fields(oriented, [mlp['down']]), columns)
  else:
    mlp.update(gate=_per_layer(gate), up=_per_layer(up), down=_per_layer(mlp['down']))
  out = {**params, 'layers': {**layers, 'attention': attention, 'mlp': mlp}}
  return out if columns else _for_the_kernel(out)


def _for_the_kernel(params: dict) -> dict:
  """The rows layout's quantized [out, in] matrices (fused qkv, gate_up, down; o [N, H, D]
  as its [D, N H] matrix; the tied embedding, which is the LM head) in quant.kernel_form,
  where the CPU kernel is built (models/cpu_kernels): one-token calls at batch 1 then
  multiply through it, other calls dequantize the same form (project)."""
  from models import cpu_kernels
  if not ((quant.contains_quantized(params['layers']) or quant.is_quantized(
      params.get('embedding'))) and cpu_kernels.available()):
    return params

  def convert(weight):
    if isinstance(weight, PerLayer):
      forms = [quant.kernel_form(w) for w in weight.arrays]
      return PerLayer(forms, weight.transposed) if all(f is not None for f in forms) else weight
    form = quant.kernel_form(weight)
    return weight if form is None else form

  def as_matrix(o):     # a quantized o [N, H, D] (groups along H) -> its [D, N H] matrix
    if not quant.is_quantized(o) or o['qvalue'].ndim != 3:
      return None
    return {k: None if v is None else v.transpose(2, 0, 1).reshape(v.shape[2], -1)
            for k, v in o.items()}

  layers = params['layers']
  attention = {k: convert(v) if k == 'qkv' else v for k, v in layers['attention'].items()}
  o = attention.get('o')
  if isinstance(o, PerLayer) and not o.transposed:
    forms = [quant.kernel_form(as_matrix(w)) for w in o.arrays]   # None where it cannot
    if all(f is not None for f in forms):
      attention['o'] = PerLayer(forms)
  mlp = {k: convert(v) if k in ('gate_up', 'down') else v for k, v in layers['mlp'].items()}
  out = {**params, 'layers': {**layers, 'attention': attention, 'mlp': mlp}}
  if 'lm_head' not in params and quant.is_quantized(params.get('embedding')):
    out['embedding'] = convert(params['embedding'])
  return out


def rms_norm(x, scale, eps: float, dtype):
  """x [..., D] normalised by its root mean square (in float32) times scale [D]."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps, self.dtype)


def project_qkv(x, weights, config, queries: bool = True):
  """The query, key and value projections of one attention layer (not yet rotated).

  x: [B, T, D] (after the layer's attention norm); weights: the layer's attention
  parameters, q [D, N, H], k and v [D, K, H] (maybe quantized, or LayerWeights) and
  optional biases, or the decoding layout's 'qkv' [E, D] (decoding_layout).
  Returns (q [B, T, N, H] or None when not `queries`, k, v [B, T, K, H]) in the
  activation dtype."""
  c, dtype = config, config.activation_dtype
  bias = lambda name: weights[name].astype(dtype) if weights.get(name) is not None else 0
  if 'qkv' in weights:
    qkv = project('BTD,ED->BTE', x, weights['qkv'], dtype) + bias('qkv_bias')
    nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    heads = lambda part, n: part.reshape(x.shape[:2] + (n, c.head_dim))
    q = heads(qkv[..., :nq], c.num_heads) if queries else None
    return (q, heads(qkv[..., nq:nq + nk], c.num_kv_heads),
            heads(qkv[..., nq + nk:], c.num_kv_heads))
  q = (project('BTD,DNH->BTNH', x, weights['q'], dtype) + bias('q_bias')) if queries else None
  k = project('BTD,DKH->BTKH', x, weights['k'], dtype) + bias('k_bias')
  v = project('BTD,DKH->BTKH', x, weights['v'], dtype) + bias('v_bias')
  return q, k, v


def _attend(q, k, v, mask, config):
  """Grouped-query softmax attention. q: [B, T, K, G, H]; k, v: [B, K, S, H] (the
  cache's kv-head-major order); mask: [B, T, S] bool. Returns [B, T, N, H] in the
  activation dtype.

  Arranged for small T (decoding), where the textbook form (scores, softmax, product)
  spends most of its time on XLA:CPU outside the arithmetic: the G * T queries of a
  kv head are the columns of one product with its contiguous [S, H] keys, the scale is
  applied to the queries, and the softmax is normalised after the product with the
  values (G * T * H divisions instead of G * T * S). The scores are computed with slots
  as the product's rows and kept in that form (an optimization barrier) before being
  transposed, so a slot's score does not depend on how many slots are read, and the
  normaliser is a product with ones: attention over a window then equals attention over
  the whole cache bit for bit for calls of one token and of many (tests/test_model.py;
  a call of 2 tokens can differ in the last bit). About 1.4x faster over 1024 slots than the textbook form here
  (README, "Where the gap to llama.cpp is"); equal to it to float32 rounding. A row with
  every slot masked averages all values uniformly (as a softmax over equal scores)."""
  dtype = config.activation_dtype
  batch, length, kv_heads, groups, head_dim = q.shape
  queries = jnp.einsum('BTKGH->BKGTH', q * jnp.asarray(head_dim ** -0.5, q.dtype))
  queries = queries.reshape(batch, kv_heads, groups * length, head_dim)    # [B, K, M, H]
  scores = jax.lax.optimization_barrier(
      jnp.einsum('BKSH,BKMH->BKSM', k.astype(dtype), queries).astype(jnp.float32))
  scores = jnp.swapaxes(scores, 2, 3).reshape(batch, kv_heads, groups, length, -1)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))    # [B, K, G, T, S]
  weights = weights.reshape(batch, kv_heads, groups * length, -1)
  # The normaliser as a product with ones, not a reduction: XLA:CPU's reduction over S
  # associates differently with S for one or two queries, its product does not.
  total = jnp.einsum('BKMS,S->BKM', weights, jnp.ones(weights.shape[-1:], weights.dtype))
  total = total[..., None]                                                   # [B, K, M, 1]
  weights = weights.astype(dtype)
  out = jnp.einsum('BKMS,BKSH->BKMH', weights, v.astype(dtype)).astype(jnp.float32) / total
  out = jnp.einsum('BKGTH->BTKGH', out.reshape(batch, kv_heads, groups, length, head_dim))
  return out.reshape(batch, length, config.num_heads, head_dim).astype(dtype)


# The smallest key window of cached attention; windows double up to the capacity.
MIN_ATTENTION_WINDOW = 128


def attention_windows(capacity: int) -> tuple[int, ...]:
  """The key-prefix lengths cached attention chooses from: 128, 256, ... (doubling) below
  `capacity`, then the capacity itself."""
  sizes, size = [], MIN_ATTENTION_WINDOW
  while size < capacity:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (capacity,)


def _cached_attend(q, cache_k, cache_v, layer, mask, config):
  """Attention of q [B, T, K, G, H] over cache layer `layer` of cache_k/v [L, B, K, S, H],
  reading only the slot prefix that any query may see.

  The prefix is the smallest of attention_windows(S) covering the last slot the mask
  [B, T, S] allows (a lax.switch over static prefix lengths), so the cost follows the
  used part of the cache (the longest row's context plus this call's slots), not the
  capacity. Slots past it are masked for every query: their softmax weights are exactly
  0 (exp of float32 min minus the row max underflows), so the result equals attention
  over all S slots; tokens were checked bit-identical (tests/test_model.py).
  """
  _, batch, heads, capacity, head_dim = cache_k.shape
  windows = attention_windows(capacity)

  def attend(size):
    def branch(q, cache_k, cache_v, mask):
      start = (layer, 0, 0, 0, 0)
      shape = (1, batch, heads, size, head_dim)
      k = jax.lax.dynamic_slice(cache_k, start, shape)[0]
      v = jax.lax.dynamic_slice(cache_v, start, shape)[0]
      return _attend(q, k, v, mask[:, :, :size], config)
    return branch

  if len(windows) == 1:
    return attend(capacity)(q, cache_k, cache_v, mask)
  used = jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), jnp.arange(1, capacity + 1), 0))
  index = jnp.searchsorted(jnp.asarray(windows), used)
  return jax.lax.switch(index, [attend(s) for s in windows], q, cache_k, cache_v, mask)


class Attention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, write_slots, layer=0):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool.

    cache_kv: None (keys are this call's T tokens, S = T) or the whole cache (k, v),
    each [L, B, K, S, H], of which this block owns layer `layer` (an int or a traced
    int32 scalar: the index inside a layer scan); write_slots: [B, T] cache slots
    receiving this call's keys/values (slots >= S are dropped). The new keys/values
    are scattered into the buffers at [layer, b, write_slots[b]] (in place inside a
    jitted loop: nothing else is copied).
    Returns ([B, T, D], the updated (k, v) buffers or None).
    """
    c = self.config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    if self.has_variable('params', 'qkv'):   # the decoding layout (decoding_layout)
      weights = {name: self.get_variable('params', name)
                 for name in ('qkv', 'qkv_bias') if self.has_variable('params', name)}
    else:
      d_std = c.d_model ** -0.5
      weights = dict(
          q=_param(self, 'q', _init(d_std, ('embed', 'heads', 'head_dim')),
                   (c.d_model, c.num_heads, c.head_dim), pdtype),
          k=_param(self, 'k', _init(d_std, ('embed', 'kv_heads', 'head_dim')),
                   (c.d_model, c.num_kv_heads, c.head_dim), pdtype),
          v=_param(self, 'v', _init(d_std, ('embed', 'kv_heads', 'head_dim')),
                   (c.d_model, c.num_kv_heads, c.head_dim), pdtype))
    wo = _param(self, 'o', _init((c.num_heads * c.head_dim) ** -0.5 / (2 * c.num_layers) ** 0.5,
                               ('heads', 'head_dim', 'embed')),
                    (c.num_heads, c.head_dim, c.d_model), pdtype)
    if c.qkv_bias and 'qkv' not in weights:
      zeros = nn.initializers.zeros
      for name, axes, heads in (('q', 'heads', c.num_heads), ('k', 'kv_heads', c.num_kv_heads),
                                ('v', 'kv_heads', c.num_kv_heads)):
        weights[f'{name}_bias'] = self.param(
            f'{name}_bias', nn.with_logical_partitioning(zeros, (axes, 'head_dim')),
            (heads, c.head_dim), pdtype)
    q, k, v = project_qkv(x, weights, c)
    q, k = rope.rotate(q, positions, c), rope.rotate(k, positions, c)
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(q.shape[:2] + (c.num_kv_heads, groups, c.head_dim))       # [B, T, K, G, H]

    new_kv = None
    if cache_kv is None:
      out = _attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, c)
    else:
      # Scatter this call's keys into each row's own slots; out-of-range slots are dropped.
      cache_k, cache_v = cache_kv
      rows = jnp.arange(x.shape[0])[:, None]                                 # [B, 1]
      cache_k = cache_k.at[layer, rows, :, write_slots].set(k.astype(cache_k.dtype), mode='drop')
      cache_v = cache_v.at[layer, rows, :, write_slots].set(v.astype(cache_v.dtype), mode='drop')
      new_kv = (cache_k, cache_v)                                            # [L, B, K, S, H]
      out = _cached_attend(q, cache_k, cache_v, layer, mask, c)
    return project('BTNH,NHD->BTD', out, wo, dtype), new_kv


class MLP(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    if self.has_variable('params', 'gate_up'):   # the decoding layout (decoding_layout)
      both = project('BTD,ED->BTE', x, self.get_variable('params', 'gate_up'), dtype)
      h = nn.silu(both[..., :c.mlp_dim]) * both[..., c.mlp_dim:]
      h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
      return project('BTF,DF->BTD', h, self.get_variable('params', 'down'), dtype)
    in_init = _init(c.d_model ** -0.5, ('embed', 'mlp'))
    gate = _param(self, 'gate', in_init, (c.d_model, c.mlp_dim), pdtype)
    up = _param(self, 'up', in_init, (c.d_model, c.mlp_dim), pdtype)
    down = _param(self, 'down', _init(c.mlp_dim ** -0.5 / (2 * c.num_layers) ** 0.5,
                                      ('mlp', 'embed')), (c.mlp_dim, c.d_model), pdtype)
    h = nn.silu(project('BTD,DF->BTF', x, gate, dtype))
    h = h * project('BTD,DF->BTF', x, up, dtype)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return project('BTF,FD->BTD', h, down, dtype)


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, write_slots, layer=0):
    """One decoder layer; the arguments and the cache as in Attention."""
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, c.activation_dtype, _DTYPES[c.param_dtype], name=name)
    attn_out, new_kv = Attention(c, name='attention')(
        norm('attention_norm')(x), positions, mask, cache_kv, write_slots, layer)
    x = x + attn_out
    x = x + MLP(c, name='mlp')(norm('mlp_norm')(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


def _stacked_block_init(config: TransformerConfig, count: int):
  """Initializer of `count` blocks' parameters stacked on a leading 'layers' axis (each
  block drawn from its own key, as separate blocks would be)."""
  def init(rng):
    x = jnp.zeros((1, 1, config.d_model), config.activation_dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    one = lambda key: Block(config, parent=None).init(key, x, positions, mask, None, None)['params']
    stacked = jax.vmap(one)(jax.random.split(rng, count))
    return jax.tree.map(lambda box: box.add_axis(0, {nn.PARTITION_NAME: 'layers'}), stacked,
                        is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
  return init


_OLD_LAYER_KEY = re.compile(r'(block|future)_(\d+)')


def stack_layer_params(params: dict) -> dict:
  """Parameters in the per-layer layout of checkpoints written before the layer scan
  (top-level 'block_0' .. 'block_{L-1}', MTP heads 'future_2' .. 'future_n') ->
  today's layout ('layers' and 'future': each leaf stacked on a leading axis). Trees
  without such keys (today's layout, heads, drafters) are returned as they are.
  The one place old checkpoints are converted (training/checkpoints.restore_model)."""
  groups: dict = {}
  rest = {}
  for key, value in params.items():
    match = _OLD_LAYER_KEY.fullmatch(key)
    if match is None:
      rest[key] = value
    else:
      groups.setdefault(match.group(1), {})[int(match.group(2))] = value
  for kind, layers in groups.items():
    ordered = [layers[i] for i in sorted(layers)]
    rest['layers' if kind == 'block' else 'future'] = jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *ordered)
  return rest


def unstack_layer_params(params: dict) -> dict:
  """The inverse of stack_layer_params: per-layer 'block_i' / 'future_i' trees (what the
  HF and GGUF exporters name tensor by tensor)."""
  out = {k: v for k, v in params.items() if k not in ('layers', 'future')}
  for kind, first, name in (('layers', 0, 'block'), ('future', 2, 'future')):
    if kind in params:
      count = jax.tree.leaves(params[kind])[0].shape[0]
      for i in range(count):
        out[f'{name}_{first + i}'] = jax.tree.map(lambda leaf, i=i: leaf[i], params[kind])
  return out


class Transformer(nn.Module):
  """Token embedding, L blocks, final norm and LM head: the autoregressive LM.

  Other families reuse this trunk and add heads or a different mask rule.

  The blocks' parameters are stacked on a leading 'layers' axis (params['layers'],
  each leaf [L, ...]) and run as one lax.scan, so a 30-layer model compiles one block
  body instead of 30; the KV cache [L, B, K, S, H] is carried through the scan and
  written in place at the layer index.

  Multi-token prediction (Gloeckle et al. 2024; config.mtp_heads = n > 1): blocks
  0 .. L-2 are the shared trunk, block L-1 is head 1 (next token) and n - 1 more
  blocks (params['future'], stacked) read the trunk's output in parallel, head i
  predicting token t + i and holding cache layer L + i - 2; all heads share the final
  norm and the unembedding. Head 1 alone is exactly an L-layer LM, so every decoding
  method decodes an MTP model as its head 1, and the extra heads only draft
  (self-speculation in decoding/medusa.py).
  """
  config: TransformerConfig

  def setup(self):
    c = self.config
    pdtype = _DTYPES[c.param_dtype]
    self.embedding = _param(self, 'embedding', _init(1.0, ('vocab', 'embed')),
                                (c.padded_vocab_size, c.d_model), pdtype)
    self.layer_params = _param(self, 'layers', _stacked_block_init(c, c.num_layers))
    if c.mtp_heads > 1:
      self.future_params = _param(self, 'future', _stacked_block_init(c, c.mtp_heads - 1))
    self.final_norm = RMSNorm(c.norm_eps, c.activation_dtype, pdtype, name='final_norm')
    if c.exit_layers:
      if c.exit_norm:
        self.exit_norms = _param(self, 'exit_norms', nn.with_logical_partitioning(
            nn.initializers.ones, ('layers', 'embed')), (len(c.exit_layers), c.d_model), pdtype)
      # CALM's early-exit classifier (section 3.5): confidence = sigmoid(w . h + b) on an
      # exit's normalised hidden state h; trained on frozen states (objectives/early_exit).
      self.exit_classifier = _param(self, 'exit_classifier', nn.with_logical_partitioning(
          nn.initializers.zeros, ('embed',)), (c.d_model + 1,), pdtype)
    if not c.tie_embeddings:
      self.lm_head = _param(self, 'lm_head', _init(c.d_model ** -0.5, ('embed', 'vocab')),
                                (c.d_model, c.padded_vocab_size), pdtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D]."""
    return quant.take_rows(self.embedding, tokens, self.config.activation_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] final hidden -> [B, T, V] float32 logits (padded ids included)."""
    c = self.config
    weight = self.embedding if c.tie_embeddings else self.lm_head
    return quant.head_logits(hidden, weight, c.tie_embeddings, c.activation_dtype).astype(
        jnp.float32)

  def head(self, x: jax.Array) -> jax.Array:
    """[B, T, D] the last block's output -> [B, T, V] float32 logits (final norm + LM head)."""
    return self.logits(self.final_norm(x))

  def exit_hidden(self, x: jax.Array, exit_index) -> jax.Array:
    """[B, T, D] the output of block exit_layers[exit_index] - 1 -> the exit's normalised
    hidden state [B, T, D]: its own RMSNorm (config.exit_norm) or the shared final norm.
    exit_index: an int or a traced int32 scalar into config.exit_layers; len(exit_layers)
    = the last block (the final norm)."""
    c = self.config
    if not c.exit_norm:
      return self.final_norm(x)
    count = len(c.exit_layers)
    scale = self.exit_norms[jnp.minimum(exit_index, count - 1)]
    normed = rms_norm(x, scale, c.norm_eps, c.activation_dtype)
    if isinstance(exit_index, int):
      return normed if exit_index < count else self.final_norm(x)
    return jnp.where(exit_index < count, normed, self.final_norm(x))

  def exit_confidence(self, hidden: jax.Array) -> jax.Array:
    """CALM's trained early-exit classifier (Schuster et al. 2022, section 3.5): an exit's
    normalised hidden state [..., D] -> the probability [...] that the exit's prediction
    equals the final layer's (sigmoid of a linear function)."""
    w = self.exit_classifier.astype(jnp.float32)
    return jax.nn.sigmoid(hidden.astype(jnp.float32) @ w[:-1] + w[-1])

  def propagate(self, x: jax.Array, positions: jax.Array, cache: KVCache,
                write_slots: jax.Array, start) -> KVCache:
    """CALM's state propagation (Schuster et al. 2022, section 4.1): the keys/values of
    blocks start .. L - 1 for this call's tokens computed from x [B, T, D] (an exit's
    hidden state, copied up to every skipped layer), written at write_slots [B, T] of
    cache layers start .. L - 1, so later tokens attend to every layer. Only each block's
    attention norm and key/value projections run (no attention, no MLP). start: an int
    or a traced int32 scalar."""
    c = self.config
    rows = jnp.arange(x.shape[0])[:, None]

    def layer(i, kv):
      p = _block_view(jax.tree.map(lambda leaf: leaf[i], _stacked_part(self.layer_params)),
                      self.layer_params, i)
      h = rms_norm(x, p['attention_norm']['scale'], c.norm_eps, c.activation_dtype)
      a = p['attention']
      _, k, v = project_qkv(h, a, c, queries=False)
      k = rope.rotate(k, positions, c)
      return (kv[0].at[i, rows, :, write_slots].set(k.astype(kv[0].dtype), mode='drop'),
              kv[1].at[i, rows, :, write_slots].set(v.astype(kv[1].dtype), mode='drop'))

    k, v = jax.lax.fori_loop(start, c.num_layers, layer, (cache.k, cache.v))
    return cache.replace(k=k, v=v)

  def blocks(self, x: jax.Array, positions: jax.Array, attention_mask=None,
             cache: Optional[KVCache] = None, write_slots: Optional[jax.Array] = None,
             start: int = 0, stop: Optional[int] = None, layer_ids=None):
    """Runs blocks start .. stop - 1 (a range of layers: early exit, layer skipping), or
    with layer_ids (a traced [n] int32 array) exactly those blocks in order.

    x: [B, T, D] (the embedding for start = 0, else block start - 1's output);
    positions: [B, T]; attention_mask, cache, write_slots as in __call__. Only the
    cache layers of the range are written.
    Returns (x [B, T, D] block stop - 1's output, the cache or None, per-layer outputs
    (stop - start) x [B, T, D]). The cache's lengths are unchanged even for an append:
    a range of layers is part of a forward, and the caller keeps what it decides to.
    """
    stop = self.config.num_layers if stop is None else stop
    if not 0 <= start < stop <= self.config.num_layers:
      raise ValueError(f'Block range [{start}, {stop}) is outside the {self.config.num_layers} '
                       'blocks.')
    attention_mask, write_slots = self._mask_and_slots(x.shape[:2], attention_mask, cache,
                                                       write_slots, positions)
    x, kv, outputs = self._scan(self.layer_params, start, stop, x, positions, attention_mask,
                                cache, write_slots, collect=True, layer_ids=layer_ids)
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1])
    return x, cache, tuple(outputs)

  def _scan(self, params, start, stop, x, positions, attention_masks, cache, write_slots,
            collect=False, chain=True, first_layer=None, layer_ids=None, layer_keep=None):
    """Blocks start .. stop - 1 of the stacked `params` as one lax.scan.

    chain: each block reads the previous one's output (the trunk); False: every block
    reads x (the MTP heads). first_layer: the cache layer of block `start` (default
    start). layer_ids: instead of start .. stop - 1, run exactly these blocks in order
    (a static tuple or a traced [n] int32 array of block indices, each its own cache
    layer): the layer-skipping forward; the blocks not listed pass the residual stream
    through and write no keys/values. layer_keep: [n, B] bool or None; a False entry
    drops that block for that row (its output is its input: LayerSkip's layer dropout,
    training only). Returns (the last output [B, T, D], the cache's
    (k, v) or None, the outputs [n, B, T, D] (n = stop - start or len(layer_ids)) when
    collect or chain=False, else None).
    """
    c = self.config
    full, windowed = attention_masks
    if layer_ids is None:
      first_layer = start if first_layer is None else first_layer
      layer_params = jax.tree.map(lambda leaf: leaf[start:stop], _stacked_part(params))
      blocks = start + jnp.arange(stop - start, dtype=jnp.int32)   # indices into `params`
      flag_list = [c.windowed(first_layer + i) for i in range(stop - start)]
      flags, static_flags = jnp.asarray(flag_list), set(flag_list)
      layers = first_layer + jnp.arange(stop - start, dtype=jnp.int32)
    else:
      # Each step reads its block's parameters by a dynamic index into the stack: what the
      # scan does to its own inputs, so a skipped block costs nothing.
      layer_params = None
      layers = blocks = jnp.asarray(layer_ids, jnp.int32)
      flags = (c.sliding_window > 0) & (layers >= c.window_start_layer)
      static_flags = ({c.windowed(int(i)) for i in layer_ids}
                      if isinstance(layer_ids, (tuple, list)) else {False, True})
    mixed = windowed is not None and len(static_flags) > 1
    if windowed is not None and not mixed:
      full = windowed if static_flags == {True} else full
    block = Block(c, parent=None)

    def body(carry, xs):
      h, kv = carry
      p, layer, flag, keep, index = xs
      if p is None:
        p = jax.tree.map(lambda leaf: leaf[index], _stacked_part(params))
      p = _block_view(p, params, index)   # the decoding layout's weights: LayerWeights
      mask = jnp.where(flag, windowed, full) if mixed else full
      out, kv = block.apply({'params': p}, h if chain else x, positions, mask, kv,
                            write_slots, layer)
      if keep is not None:
        out = jnp.where(keep[:, None, None], out, h if chain else x)
      return (out if chain else h, kv), (out if collect or not chain else None)

    kv = None if cache is None else (cache.k, cache.v)
    (h, kv), outputs = jax.lax.scan(body, (x, kv),
                                     (layer_params, layers, flags, layer_keep, blocks))
    return (h if chain else outputs[-1]), kv, outputs

  def _mask_and_slots(self, shape, attention_mask, cache, write_slots, positions):
    """The default mask (causal; over cache slots with a cache) and write slots (an
    append after each row's valid length).

    Returns ((mask, windowed mask or None), write slots): with a sliding window
    (config.sliding_window > 0) the windowed layers get the mask restricted to keys at
    positions > p - window for a query at position p. Key positions: without a cache
    this call's positions; with one, the slot for slots this call does not write
    (committed tokens sit at slot = position, accepted tree paths are moved there) and
    this call's positions at its write slots (a tree node at slot root + i has position
    root + depth), so the window is exact under tree masks too.
    """
    batch, length = shape
    if cache is None:
      attention_mask = (masks.causal_mask(batch, length) if attention_mask is None
                        else attention_mask)
      slots, key_positions = None, positions
    else:
      slots = cache.append_slots(length) if write_slots is None else write_slots
      if attention_mask is None:
        attention_mask = masks.slot_causal_mask(slots, cache.capacity)
      key_positions = None
      if self.config.sliding_window:
        rows = jnp.arange(batch)[:, None]
        key_positions = jnp.broadcast_to(jnp.arange(cache.capacity), (batch, cache.capacity))
        key_positions = key_positions.at[rows, slots].set(positions, mode='drop')
    return self._with_window(attention_mask, positions, key_positions), slots

  def _with_window(self, attention_mask, positions, key_positions):
    """(mask, the mask within the sliding window or None when no layer is windowed)."""
    window = self.config.sliding_window
    if not window:
      return attention_mask, None
    return attention_mask, masks.sliding_window_mask(attention_mask, positions,
                                                     key_positions, window)

  def __call__(self, tokens, positions, attention_mask=None, cache: Optional[KVCache] = None,
               return_layer_hidden: bool = False,
               write_slots: Optional[jax.Array] = None, layers=None, layer_keep=None,
               exit_head: Optional[int] = None,
               logits_at: Optional[jax.Array] = None) -> ForwardOutput:
    """tokens, positions: [B, T] int32.

    attention_mask: [B, T, S] bool, or None for causal. Without a cache, S = T and
      keys are this call's tokens. With a cache, S is the cache capacity and keys are
      cache slots; None then means causal over slots (slot s <= the query's slot).
    cache: a KVCache or None. write_slots: [B, T] the slots receiving this call's
      keys/values; None = append after cache.lengths, and the returned cache's lengths
      advance by T. With explicit write_slots the returned lengths are unchanged (the
      caller keeps what it decides to keep: models/kv_cache.py); slots >= capacity
      are dropped.
    layers: None (every block), or the blocks to run, in increasing order (a static
      tuple or a traced [n] int32 array of block indices): the layer-skipping forward
      of self-speculation (Draft & Verify, Zhang et al. 2024; LayerSkip, Elhoushi et al.
      2024; the first E blocks = early exit). A block not listed passes the residual
      stream through unchanged and writes no keys/values; the final norm and LM head
      are the model's own. layer_hidden then holds the n run blocks' outputs.
      Raises ValueError for a multi-token prediction model.
    layer_keep: [L, B] bool or None: LayerSkip's layer dropout (training); a dropped
      block passes its row's residual stream through (plain LMs only).
    exit_head: None, or an exit layer E of config.exit_layers: the logits are exit E's
      head (its norm, the shared unembedding) on the last run block's output (the
      LayerSkip self-speculation draft of an early-exit model: layers = the first E).
    logits_at: None (logits at every position: [B, T, V]), or [B, n] int32 indices into
      this call's T positions: the logits there only ([B, n, V]; hidden stays
      [B, T, D]). A prefill needs the next-token logits at each row's last prompt
      position alone (decoding/driver.prefill); the LM head over every position was
      about a sixth of the arithmetic of SmolLM2's 1200-token prefill, and wrote a
      [T, 49152] float32 array.
    """
    c = self.config
    batch, length = tokens.shape
    append = cache is not None and write_slots is None
    attention_mask, write_slots = self._mask_and_slots((batch, length), attention_mask, cache,
                                                       write_slots, positions)
    x = nn.with_logical_constraint(self.embed(tokens), ('batch', 'length', 'embed'))
    run = functools.partial(self._scan, positions=positions, attention_masks=attention_mask,
                            write_slots=write_slots)
    collect = return_layer_hidden
    future_logits = None
    if layers is not None and c.mtp_heads > 1:
      raise ValueError('Layer skipping runs a plain LM; this model has multi-token '
                       f'prediction heads (mtp_heads={c.mtp_heads}).')
    if c.mtp_heads == 1:
      x, kv, layer_hidden = run(self.layer_params, 0, c.num_layers, x, cache=cache,
                                collect=collect, layer_ids=layers, layer_keep=layer_keep)
    else:
      # The trunk (blocks 0 .. L-2), head 1's block, then the future heads reading the trunk.
      trunk, kv, hidden_trunk = (run(self.layer_params, 0, c.num_layers - 1, x, cache=cache,
                                     collect=collect) if c.num_layers > 1 else (x, None, None))
      kv_cache = cache if kv is None else cache.replace(k=kv[0], v=kv[1])
      x, kv, hidden_last = run(self.layer_params, c.num_layers - 1, c.num_layers, trunk,
                               cache=kv_cache, collect=collect)
      layer_hidden = (hidden_last if hidden_trunk is None
                      else jnp.concatenate([hidden_trunk, hidden_last]))
      kv_cache = cache if kv is None else cache.replace(k=kv[0], v=kv[1])
      _, kv, future = run(self.future_params, 0, c.mtp_heads - 1, trunk, cache=kv_cache,
                          chain=False, first_layer=c.num_layers)
      future_logits = jnp.stack([self.logits(self.final_norm(h)) for h in future],
                                axis=2)                                      # [B, T, n-1, V]
    if exit_head is None:
      hidden = self.final_norm(x)
    else:
      if exit_head not in c.exit_layers:
        raise ValueError(f'Exit layer {exit_head} has no exit head (this model\'s exits: '
                         f'{", ".join(map(str, c.exit_layers)) or "none"}).')
      hidden = self.exit_hidden(x, c.exit_layers.index(exit_head))
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=kv[0], v=kv[1],
                          lengths=cache.lengths + length if append else cache.lengths)
    head_in = (hidden if logits_at is None else
               jnp.take_along_axis(hidden, logits_at[..., None].astype(jnp.int32), axis=1))
    return ForwardOutput(logits=self.logits(head_in), hidden=hidden, cache=new_cache,
                         layer_hidden=tuple(layer_hidden) if return_layer_hidden else None,
                         future_logits=future_logits)

  def resume(self, x, positions, attention_mask=None, cache: Optional[KVCache] = None,
             start: int = 0) -> ForwardOutput:
    """The forward from block `start` on: x [B, T, D] is block start - 1's output (the
    embedding for start = 0) for this call's T tokens at positions [B, T]; runs blocks
    start .. L - 1, the final norm and the LM head. The mask and the cache as in
    __call__ with an append: the cache's layers >= start get this call's keys/values at
    slots lengths .. lengths + T - 1 and its lengths advance by T (layers < start must
    already hold them: LayerSkip's reuse of the draft's shared-layer cache, Elhoushi et
    al. 2024, section 4.3). Plain LMs only (mtp_heads = 1).
    """
    if self.config.mtp_heads > 1:
      raise ValueError('resume runs a plain LM; this model has multi-token prediction heads.')
    x, cache, _ = self.blocks(x, positions, attention_mask, cache, start=start)
    hidden = self.final_norm(x)
    if cache is not None:
      cache = cache.keep(cache.lengths + x.shape[1])
    return ForwardOutput(logits=self.logits(hidden), hidden=hidden, cache=cache)

  # The two halves of a multi-token prediction forward, for the sequential head
  # backward of training (no cache): trunk(...) -> z, then head_logits(i, z, ...).

  def trunk(self, tokens, positions, attention_mask) -> jax.Array:
    """[B, T] tokens -> [B, T, D] the shared trunk's output (the last block's input)."""
    x = self.embed(tokens)
    if self.config.num_layers == 1:
      return x
    masks_ = self._with_window(attention_mask, positions, positions)
    x, _, _ = self._scan(self.layer_params, 0, self.config.num_layers - 1, x, positions,
                         masks_, None, None)
    return x

  def head_logits(self, head: int, trunk, positions, attention_mask) -> jax.Array:
    """Head `head` (1 = next token, i = token t + i) on the trunk's output -> [B, T, V]."""
    c = self.config
    masks_ = self._with_window(attention_mask, positions, positions)
    if head == 1:
      x, _, _ = self._scan(self.layer_params, c.num_layers - 1, c.num_layers, trunk, positions,
                           masks_, None, None)
    else:
      x, _, _ = self._scan(self.future_params, head - 2, head - 1, trunk, positions, masks_,
                           None, None, first_layer=c.num_layers + head - 2)
    return self.logits(self.final_norm(x))
