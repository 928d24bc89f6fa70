"""Draft heads that read the target's own hidden states.

Medusa (Cai et al. 2024): K heads on the last hidden state h_t (after the final norm);
head k (1-based) predicts token t + k + 1, one step further than the LM head does:

    logits_k = W_k^T (h_t + SiLU(A_k h_t + b_k))        A_k: [D, D], W_k: [D, V]

A_k starts at zero and W_k at the target's LM head, so before training every head
predicts what the LM head predicts (the paper's initialisation).

EAGLE (Li et al. 2024): a one-layer drafter that works at the feature level, the
target's final hidden state f_t (what its LM head reads). At position t it reads f_t
and the embedding of the token that followed, x_{t+1}, and predicts f_{t+1}:

    f^_{t+1} = Layer(W_fc [e(x_{t+1}); f_t] + b_fc)            (causal over t)

whose logits, through the target's own (frozen) LM head, propose x_{t+2}. Drafting
continues on its own predictions: (f^_{t+1}, x_{t+2}) -> f^_{t+2}, and so on. The
token embedding and LM head are the target's and are not part of the drafter.

EAGLE-3 (Li et al. 2025, "Scaling up inference acceleration of LLMs via training-time
test", section 3): the same drafter with `feature_layers` set. Its input at a committed
position is a fused projection of the target's low, middle and high block outputs,
g_t = RMSNorm(W_fuse [l_t; m_t; h_t]) (no bias, as the paper's fc), instead of the final hidden
state; its output is no longer regressed onto a target feature (EAGLE-3 drops that
loss), so it passes a final RMSNorm of the drafter's own before the target's LM head, and
the next drafting step reads that output in place of g (the paper: the draft model's
own output replaces the target feature; its code feeds the output before that norm,
here one normed output per node serves both, which keeps the drafter one layer plus
its norm and lets a tree node carry one feature). Trained with training-time test
(training/objectives/eagle.py).
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import masks
from models.kv_cache import KVCache
from models.transformer import _DTYPES, Block, RMSNorm, TransformerConfig


class MedusaHeads(nn.Module):
  config: TransformerConfig        # the target's (d_model, padded vocabulary, dtypes)
  num_heads: int

  def example_inputs(self):
    """Abstract arguments of `init` (for shapes and shardings)."""
    return (jax.ShapeDtypeStruct((1, 1, self.config.d_model), jnp.float32),)

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden: [B, T, D] the target's final hidden states -> logits [B, T, K, V] float32."""
    c = self.config
    dtype = c.activation_dtype
    partition = nn.with_logical_partitioning
    block = self.param('block', partition(nn.initializers.zeros, (None, 'embed', 'mlp')),
                       (self.num_heads, c.d_model, c.d_model), c.param_dtype)
    bias = self.param('block_bias', partition(nn.initializers.zeros, (None, 'mlp')),
                      (self.num_heads, c.d_model), c.param_dtype)
    out = self.param('lm_head', partition(nn.initializers.normal(c.d_model ** -0.5),
                                          (None, 'embed', 'vocab')),
                     (self.num_heads, c.d_model, c.padded_vocab_size), c.param_dtype)
    h = hidden.astype(dtype)
    residual = h[:, :, None] + nn.silu(jnp.einsum('BTD,KDE->BTKE', h, block.astype(dtype))
                                       + bias.astype(dtype))
    return jnp.einsum('BTKD,KDV->BTKV', residual, out.astype(dtype)).astype(jnp.float32)


def lm_head_matrix(target_params, config: TransformerConfig) -> jax.Array:
  """The target's LM head as [D, V] (the embedding transposed when tied)."""
  from models import quant
  if config.tie_embeddings:
    return quant.as_float(target_params['embedding'], config.param_dtype).T
  return quant.as_float(target_params['lm_head'], config.param_dtype)


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
  """EAGLE-3's low / middle / high target blocks (0-based block outputs) for a target of
  `num_layers` blocks: the first, the middle and the last. The paper's code reads
  transformers' hidden_states (2, L / 2, L - 3) of 32+ layer models, i.e. blocks 1,
  L / 2 - 1 and L - 4; on the 2- and 4-block targets here that rule would repeat or
  skip layers, so the spread (0, (L - 1) // 2, L - 1) keeps its intent (one early,
  one middle, one late layer) at every depth."""
  return (0, (num_layers - 1) // 2, num_layers - 1)


def check_feature_layers(layers, num_layers: int) -> tuple[int, ...]:
  """EAGLE-3's fused target blocks as a tuple: `layers` a sequence of ints or a string
  '0,1,3' ('' = default_feature_layers). Raises ValueError (one line) for fewer than two
  layers or a block index outside [0, num_layers)."""
  if isinstance(layers, str):
    try:
      layers = tuple(int(x) for x in layers.split(',') if x.strip())
    except ValueError:
      raise ValueError(f'feature_layers={layers!r}: give comma-separated block indices, '
                       'e.g. "0,1,3".') from None
  layers = tuple(int(x) for x in layers) or default_feature_layers(num_layers)
  if len(layers) < 2:
    raise ValueError(f'feature_layers={layers}: EAGLE-3 fuses at least two target layers.')
  bad = [x for x in layers if not 0 <= x < num_layers]
  if bad:
    raise ValueError(f'feature_layers={layers}: block {bad[0]} is outside the target\'s '
                     f'{num_layers} blocks [0, {num_layers}).')
  return layers


def target_features(drafter: 'EagleDrafter', out) -> jax.Array:
  """The target features a drafter reads from a target ForwardOutput: the final hidden
  state [B, T, D] (EAGLE), or the chosen blocks' outputs concatenated, [B, T, k * D]
  (EAGLE-3; the call must have been made with return_layer_hidden=True)."""
  if not drafter.feature_layers:
    return out.hidden
  if out.layer_hidden is None:
    raise ValueError('An EAGLE-3 drafter reads per-layer hidden states: call the target '
                     'with return_layer_hidden=True.')
  return jnp.concatenate([out.layer_hidden[i] for i in drafter.feature_layers], axis=-1)


class EagleDrafter(nn.Module):
  config: TransformerConfig        # the target's: d_model, heads, dtypes
  # EAGLE-3: the target blocks whose outputs are fused (check_feature_layers); () = EAGLE
  # (-1/-2): the target's final hidden state.
  feature_layers: tuple[int, ...] = ()

  @property
  def layer_config(self) -> TransformerConfig:
    """The drafter's one decoder layer (and its KV cache: KVCache.empty(layer_config))."""
    return dataclasses.replace(self.config, num_layers=1, mtp_heads=1)

  @property
  def feature_size(self) -> int:
    """The width of the target features the drafter reads: D, or k * D (EAGLE-3)."""
    return self.config.d_model * max(len(self.feature_layers), 1)

  def example_inputs(self):
    """Abstract arguments of `init` (for shapes and shardings); EAGLE-3's features are
    the target's k fused layers, so that `init` creates the fusion matrix."""
    feature = jax.ShapeDtypeStruct((1, 1, self.feature_size), jnp.float32)
    embedding = jax.ShapeDtypeStruct((1, 1, self.config.d_model), jnp.float32)
    return (feature, embedding, jax.ShapeDtypeStruct((1, 1), jnp.int32))

  @nn.compact
  def __call__(self, features: jax.Array, token_embeddings: jax.Array, positions: jax.Array,
               attention_mask: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               write_slots: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """features: [B, T, D] f_t (the target's, or the drafter's own predictions); for an
    EAGLE-3 drafter also [B, T, k * D], the target's k chosen block outputs concatenated
    (target_features), which the drafter fuses to [B, T, D] first (static: by width);
    token_embeddings: [B, T, D] the target's embedding of x_{t+1}; positions: [B, T].

    attention_mask / cache / write_slots as in models.Transformer (None: causal; an
    append advances the cache's lengths by T, explicit write slots leave them). Returns
    the predicted features f^_{t+1} [B, T, D] and the updated cache.
    """
    c = self.layer_config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    d = c.d_model
    if self.feature_layers:
      fuse = self.param('fuse', nn.with_logical_partitioning(
          nn.initializers.normal(self.feature_size ** -0.5), ('mlp', 'embed')),
                        (self.feature_size, d), pdtype)
      # The fused target features are normed as the drafter's own (head-normed) outputs
      # are, so the one input layer sees one scale whichever it reads (the paper's code
      # norms every incoming hidden state: its hidden_norm).
      # (init reads target features: example_inputs, families.init_params.)
      fuse_norm = RMSNorm(c.norm_eps, dtype, pdtype, name='fuse_norm')
      if features.shape[-1] == self.feature_size:
        features = fuse_norm(jnp.einsum('BTF,FD->BTD', features.astype(dtype),
                                        fuse.astype(dtype)))
      elif features.shape[-1] != d:
        raise ValueError(f'EAGLE-3 features are [B, T, {d}] or [B, T, {self.feature_size}]; '
                         f'got {features.shape}.')
    fc = self.param('fc', nn.with_logical_partitioning(nn.initializers.normal((2 * d) ** -0.5),
                                                       ('mlp', 'embed')), (2 * d, d), pdtype)
    fc_bias = self.param('fc_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('embed',)), (d,), pdtype)
    x = jnp.concatenate([token_embeddings.astype(dtype), features.astype(dtype)], axis=-1)
    x = jnp.einsum('BTE,ED->BTD', x, fc.astype(dtype)) + fc_bias.astype(dtype)
    batch, length = positions.shape
    # EAGLE-3's output is read by the target's LM head and by the next step, not
    # regressed onto a normed target feature: its own final norm puts it on that scale.
    head_norm = (RMSNorm(c.norm_eps, dtype, pdtype, name='head_norm') if self.feature_layers
                 else lambda h: h)
    if cache is None:
      mask = masks.causal_mask(batch, length) if attention_mask is None else attention_mask
      out, _ = Block(c, name='layer')(x, positions, mask, None, None)
      return head_norm(out), None
    append = write_slots is None
    write_slots = cache.append_slots(length) if append else write_slots      # [B, T]
    if attention_mask is None:
      attention_mask = masks.slot_causal_mask(write_slots, cache.capacity)
    out, (k, v) = Block(c, name='layer')(x, positions, attention_mask, (cache.k, cache.v),
                                         write_slots)
    return head_norm(out), KVCache(k=k, v=v,
                                   lengths=cache.lengths + length if append else cache.lengths)
