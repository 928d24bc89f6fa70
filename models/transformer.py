"""The Llama-style transformer trunk and the autoregressive LM.

Axis letters used in shapes and einsums:
  B batch, T query length, S key length (cache capacity when a cache is used),
  L layers, N query heads, K kv heads, G query heads per kv head (N = K * G),
  H head dim, D model dim, F mlp hidden dim, V padded vocabulary.

The module is pure: tokens, positions, the attention mask and the KV cache are
all arguments, and the new cache is a result. Parameters carry logical axis
names (see models/sharding.py) so a mesh rule table decides their layout.
"""
import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import masks, rope
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


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, write_slots):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool.

    cache_kv: None (keys are this call's T tokens, S = T) or (k, v) each [B, S, K, H];
    write_slots: [B, T] cache slots receiving this call's keys/values.
    Returns ([B, T, D], new (k, v) or None).
    """
    c = self.config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    d_std = c.d_model ** -0.5
    wq = self.param('q', _init(d_std, ('embed', 'heads', 'head_dim')),
                    (c.d_model, c.num_heads, c.head_dim), pdtype)
    wk = self.param('k', _init(d_std, ('embed', 'kv_heads', 'head_dim')),
                    (c.d_model, c.num_kv_heads, c.head_dim), pdtype)
    wv = self.param('v', _init(d_std, ('embed', 'kv_heads', 'head_dim')),
                    (c.d_model, c.num_kv_heads, c.head_dim), pdtype)
    wo = self.param('o', _init((c.num_heads * c.head_dim) ** -0.5 / (2 * c.num_layers) ** 0.5,
                               ('heads', 'head_dim', 'embed')),
                    (c.num_heads, c.head_dim, c.d_model), pdtype)
    q = jnp.einsum('BTD,DNH->BTNH', x, wq.astype(dtype))
    k = jnp.einsum('BTD,DKH->BTKH', x, wk.astype(dtype))
    v = jnp.einsum('BTD,DKH->BTKH', x, wv.astype(dtype))
    if c.qkv_bias:
      zeros = nn.initializers.zeros
      q += self.param('q_bias', nn.with_logical_partitioning(zeros, ('heads', 'head_dim')),
                      (c.num_heads, c.head_dim), pdtype).astype(dtype)
      k += self.param('k_bias', nn.with_logical_partitioning(zeros, ('kv_heads', 'head_dim')),
                      (c.num_kv_heads, c.head_dim), pdtype).astype(dtype)
      v += self.param('v_bias', nn.with_logical_partitioning(zeros, ('kv_heads', 'head_dim')),
                      (c.num_kv_heads, c.head_dim), pdtype).astype(dtype)
    q, k = rope.rotate(q, positions, c), rope.rotate(k, positions, c)

    new_kv = None
    if cache_kv is not None:
      # Scatter this call's keys into each row's own slots; out-of-range slots are dropped.
      rows = jnp.arange(x.shape[0])[:, None]                                 # [B, 1]
      k = cache_kv[0].at[rows, write_slots].set(k.astype(cache_kv[0].dtype), mode='drop')
      v = cache_kv[1].at[rows, write_slots].set(v.astype(cache_kv[1].dtype), mode='drop')
      new_kv = (k, v)                                                        # [B, S, K, H]

    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(q.shape[:2] + (c.num_kv_heads, groups, c.head_dim))       # [B, T, K, G, H]
    scores = jnp.einsum('BTKGH,BSKH->BKGTS', q, k.astype(dtype)).astype(jnp.float32)
    scores = scores * c.head_dim ** -0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v.astype(dtype))
    out = out.reshape(out.shape[:2] + (c.num_heads, c.head_dim))
    return jnp.einsum('BTNH,NHD->BTD', out, wo.astype(dtype)), new_kv


class MLP(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    gate = self.param('gate', _init(c.d_model ** -0.5, ('embed', 'mlp')), (c.d_model, c.mlp_dim), pdtype)
    up = self.param('up', _init(c.d_model ** -0.5, ('embed', 'mlp')), (c.d_model, c.mlp_dim), pdtype)
    down = self.param('down', _init(c.mlp_dim ** -0.5 / (2 * c.num_layers) ** 0.5, ('mlp', 'embed')),
                      (c.mlp_dim, c.d_model), pdtype)
    h = nn.silu(jnp.einsum('BTD,DF->BTF', x, gate.astype(dtype)))
    h = h * jnp.einsum('BTD,DF->BTF', x, up.astype(dtype))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return jnp.einsum('BTF,FD->BTD', h, down.astype(dtype))


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv, write_slots):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, c.activation_dtype, _DTYPES[c.param_dtype], name=name)
    attn_out, new_kv = Attention(c, name='attention')(
        norm('attention_norm')(x), positions, mask, cache_kv, write_slots)
    x = x + attn_out
    x = x + MLP(c, name='mlp')(norm('mlp_norm')(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


class Transformer(nn.Module):
  """Token embedding, L blocks, final norm and LM head: the autoregressive LM.

  Other families reuse this trunk and add heads or a different mask rule.

  Multi-token prediction (Gloeckle et al. 2024; config.mtp_heads = n > 1): blocks
  0 .. L-2 are the shared trunk, block L-1 is head 1 (next token) and n - 1 more
  blocks `future_i` read the trunk's output in parallel, head i predicting token
  t + i; all heads share the final norm and the unembedding. Head 1 alone is exactly
  an L-layer LM, so every decoding method decodes an MTP model as its head 1, and
  the extra heads only draft (self-speculation in decoding/medusa.py).
  """
  config: TransformerConfig

  def setup(self):
    c = self.config
    pdtype = _DTYPES[c.param_dtype]
    self.embedding = self.param('embedding', _init(1.0, ('vocab', 'embed')),
                                (c.padded_vocab_size, c.d_model), pdtype)
    self.layers = [Block(c, name=f'block_{i}') for i in range(c.num_layers)]
    self.future_blocks = [Block(c, name=f'future_{i}') for i in range(2, c.mtp_heads + 1)]
    self.final_norm = RMSNorm(c.norm_eps, c.activation_dtype, pdtype, name='final_norm')
    if not c.tie_embeddings:
      self.lm_head = self.param('lm_head', _init(c.d_model ** -0.5, ('embed', 'vocab')),
                                (c.d_model, c.padded_vocab_size), pdtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D]."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.config.activation_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] final hidden -> [B, T, V] float32 logits (padded ids included)."""
    c = self.config
    if c.tie_embeddings:
      out = jnp.einsum('BTD,VD->BTV', hidden, self.embedding.astype(c.activation_dtype))
    else:
      out = jnp.einsum('BTD,DV->BTV', hidden, self.lm_head.astype(c.activation_dtype))
    return out.astype(jnp.float32)

  def head(self, x: jax.Array) -> jax.Array:
    """[B, T, D] the last block's output -> [B, T, V] float32 logits (final norm + LM head)."""
    return self.logits(self.final_norm(x))

  def blocks(self, x: jax.Array, positions: jax.Array, attention_mask=None,
             cache: Optional[KVCache] = None, write_slots: Optional[jax.Array] = None,
             start: int = 0, stop: Optional[int] = None):
    """Runs blocks start .. stop - 1 (a range of layers: early exit, layer skipping).

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
    new_kv, outputs = [], []
    for layer in range(start, stop):
      x = self._run(self.layers[layer], layer, x, positions, attention_mask, cache,
                    write_slots, new_kv)
      outputs.append(x)
    if cache is not None:
      cache = cache.replace(k=cache.k.at[start:stop].set(jnp.stack([k for k, _ in new_kv])),
                            v=cache.v.at[start:stop].set(jnp.stack([v for _, v in new_kv])))
    return x, cache, tuple(outputs)

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

  @staticmethod
  def _run(block, layer, x, positions, attention_masks, cache, write_slots, new_kv):
    cache_kv = None if cache is None else (cache.k[layer], cache.v[layer])
    full, windowed = attention_masks
    mask = windowed if block.config.windowed(layer) else full
    x, kv = block(x, positions, mask, cache_kv, write_slots)
    if kv is not None:
      new_kv.append(kv)
    return x

  def __call__(self, tokens, positions, attention_mask=None, cache: Optional[KVCache] = None,
               return_layer_hidden: bool = False,
               write_slots: Optional[jax.Array] = None) -> ForwardOutput:
    """tokens, positions: [B, T] int32.

    attention_mask: [B, T, S] bool, or None for causal. Without a cache, S = T and
      keys are this call's tokens. With a cache, S is the cache capacity and keys are
      cache slots; None then means causal over slots (slot s <= the query's slot).
    cache: a KVCache or None. write_slots: [B, T] the slots receiving this call's
      keys/values; None = append after cache.lengths, and the returned cache's lengths
      advance by T. With explicit write_slots the returned lengths are unchanged (the
      caller keeps what it decides to keep: models/kv_cache.py); slots >= capacity
      are dropped.
    """
    batch, length = tokens.shape
    append = cache is not None and write_slots is None
    attention_mask, write_slots = self._mask_and_slots((batch, length), attention_mask, cache,
                                                       write_slots, positions)
    x = nn.with_logical_constraint(self.embed(tokens), ('batch', 'length', 'embed'))
    new_kv, layer_hidden = [], []
    trunk = x
    for i, block in enumerate(self.layers):
      trunk = x  # the input of the last block: what every MTP head reads
      x = self._run(block, i, x, positions, attention_mask, cache, write_slots, new_kv)
      layer_hidden.append(x)
    hidden = self.final_norm(x)
    future_logits = None
    if self.future_blocks:
      future = [self.final_norm(self._run(block, self.config.num_layers + j, trunk, positions,
                                          attention_mask, cache, write_slots, new_kv))
                for j, block in enumerate(self.future_blocks)]
      future_logits = jnp.stack([self.logits(h) for h in future], axis=2)      # [B, T, n-1, V]
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=jnp.stack([k for k, _ in new_kv]),
                          v=jnp.stack([v for _, v in new_kv]),
                          lengths=cache.lengths + length if append else cache.lengths)
    return ForwardOutput(logits=self.logits(hidden), hidden=hidden, cache=new_cache,
                         layer_hidden=tuple(layer_hidden) if return_layer_hidden else None,
                         future_logits=future_logits)

  # The two halves of a multi-token prediction forward, for the sequential head
  # backward of training (no cache): trunk(...) -> z, then head_logits(i, z, ...).

  def trunk(self, tokens, positions, attention_mask) -> jax.Array:
    """[B, T] tokens -> [B, T, D] the shared trunk's output (the last block's input)."""
    x = self.embed(tokens)
    full, windowed = self._with_window(attention_mask, positions, positions)
    for i, block in enumerate(self.layers[:-1]):
      x, _ = block(x, positions, windowed if self.config.windowed(i) else full, None, None)
    return x

  def head_logits(self, head: int, trunk, positions, attention_mask) -> jax.Array:
    """Head `head` (1 = next token, i = token t + i) on the trunk's output -> [B, T, V]."""
    block = self.layers[-1] if head == 1 else self.future_blocks[head - 2]
    layer = self.config.num_layers - 2 + head
    full, windowed = self._with_window(attention_mask, positions, positions)
    x, _ = block(trunk, positions, windowed if self.config.windowed(layer) else full, None, None)
    return self.logits(self.final_norm(x))
