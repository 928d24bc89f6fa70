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
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import masks
from models.kv_cache import KVCache
from models.transformer import _DTYPES, Block, TransformerConfig


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


class EagleDrafter(nn.Module):
  config: TransformerConfig        # the target's: d_model, heads, dtypes

  @property
  def layer_config(self) -> TransformerConfig:
    """The drafter's one decoder layer (and its KV cache: KVCache.empty(layer_config))."""
    return dataclasses.replace(self.config, num_layers=1, mtp_heads=1)

  def example_inputs(self):
    """Abstract arguments of `init` (for shapes and shardings)."""
    feature = jax.ShapeDtypeStruct((1, 1, self.config.d_model), jnp.float32)
    return (feature, feature, jax.ShapeDtypeStruct((1, 1), jnp.int32))

  @nn.compact
  def __call__(self, features: jax.Array, token_embeddings: jax.Array, positions: jax.Array,
               attention_mask: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               write_slots: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """features: [B, T, D] f_t (the target's, or the drafter's own predictions);
    token_embeddings: [B, T, D] the target's embedding of x_{t+1}; positions: [B, T].

    attention_mask / cache / write_slots as in models.Transformer (None: causal; an
    append advances the cache's lengths by T, explicit write slots leave them). Returns
    the predicted features f^_{t+1} [B, T, D] and the updated cache.
    """
    c = self.layer_config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    d = c.d_model
    fc = self.param('fc', nn.with_logical_partitioning(nn.initializers.normal((2 * d) ** -0.5),
                                                       ('mlp', 'embed')), (2 * d, d), pdtype)
    fc_bias = self.param('fc_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('embed',)), (d,), pdtype)
    x = jnp.concatenate([token_embeddings.astype(dtype), features.astype(dtype)], axis=-1)
    x = jnp.einsum('BTE,ED->BTD', x, fc.astype(dtype)) + fc_bias.astype(dtype)
    batch, length = positions.shape
    if cache is None:
      mask = masks.causal_mask(batch, length) if attention_mask is None else attention_mask
      out, _ = Block(c, name='layer')(x, positions, mask, None, None)
      return out, None
    append = write_slots is None
    write_slots = cache.append_slots(length) if append else write_slots      # [B, T]
    if attention_mask is None:
      attention_mask = masks.slot_causal_mask(write_slots, cache.capacity)
    out, (k, v) = Block(c, name='layer')(x, positions, attention_mask, (cache.k, cache.v),
                                         write_slots)
    return out, KVCache(k=k, v=v,
                        lengths=cache.lengths + length if append else cache.lengths)
