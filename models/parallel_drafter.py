"""The parallel block drafter (DFlash: Chen, Liang and Liu 2026, "DFlash: Block Diffusion
for Flash Speculative Decoding", arXiv 2602.06036, section 3).

A few decoder layers of the one trunk (models.transformer.Block) that draft a whole block
in one call. Inputs:

  the block     block_size entries at positions r .. r + block_size - 1: entry 0 is the
                last committed token x_r (the round's root, embedded with the target's
                frozen embedding), entries 1 .. block_size - 1 are the mask token;
                attention inside the block is bidirectional (the block diffusion
                denoiser of BD3-LM, models/block_diffusion.py, with every drafted
                position masked: one denoising step from the all-mask state);
  the context   the target's hidden states of the committed tokens x_t, t < r, from
                several chosen target layers (low to high), concatenated and fused by one
                projection: c_t = RMSNorm(W_fc [h_t^{l_1}; ...; h_t^{l_n}]).

KV injection (the paper's section 3.2): c_t is not a token the drafter's layers process
in turn; every draft layer reads the same c_t as keys and values of its own attention.
Here each layer runs the trunk's Block on [c; h] (the context entries, then the block's
current states h) and keeps only the block's outputs: the context entries' keys and
values at layer l are then a function of c_t alone, written once into the drafter's KV
cache, and the block queries attend to them and to the block. (Their queries and MLP are
computed and dropped: at decoding that is the one to `depth + 1` newly committed entries
per round; the trunk's Block has no keys-only path, and adding one would be a second
attention.)

Block output k (k >= 1) is the drafter's distribution for x_{r+k}, through its final
norm and the target's frozen LM head.

The mask token is a learned vector of the drafter ('mask_embedding'), not a row of the
target's embedding: the target is frozen and its vocabulary need not have a spare id
(the small targets here have none; BD3-LM models add one id, models/block_diffusion.py,
but they train their embedding).
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.kv_cache import KVCache
from models.transformer import _DTYPES, Block, RMSNorm, TransformerConfig


def default_target_layers(num_target_layers: int, count: int = 3) -> tuple[int, ...]:
  """`count` target blocks spread from the first to the last (low, middle, high
  features; EAGLE-3 and DFlash both fuse such a spread): round(i (L - 1) / (count - 1)),
  duplicates removed. Raises ValueError for count < 1."""
  if count < 1:
    raise ValueError(f'The drafter reads at least one target layer; got {count}.')
  if count == 1:
    return (num_target_layers - 1,)
  return tuple(sorted({round(i * (num_target_layers - 1) / (count - 1)) for i in range(count)}))


class ParallelDrafter(nn.Module):
  """DFlash's drafter on a target of `config` (the target's TransformerConfig: d_model,
  heads, dtypes; the drafter's layers have the target's width).

  num_layers: drafter layers; block_size: entries per drafted block (the root + the
  block_size - 1 drafted positions) it is trained on; target_layers: the target blocks
  whose outputs (Transformer(..., return_layer_hidden=True).layer_hidden) are fused.
  """
  config: TransformerConfig
  num_layers: int = 2
  block_size: int = 8
  target_layers: tuple[int, ...] = (0,)

  @property
  def layer_config(self) -> TransformerConfig:
    """The drafter's layers (and its KV cache: KVCache.empty(layer_config))."""
    return dataclasses.replace(self.config, num_layers=self.num_layers, mtp_heads=1,
                               sliding_window=0)

  @property
  def feature_size(self) -> int:
    """F: the concatenated target features per entry."""
    return len(self.target_layers) * self.config.d_model

  def example_inputs(self):
    """Abstract arguments of `init` (for shapes and shardings)."""
    d = self.config.d_model
    return (jax.ShapeDtypeStruct((1, 1, self.feature_size), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, d), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.bool_),
            jax.ShapeDtypeStruct((1, 2), jnp.int32),
            jax.ShapeDtypeStruct((1, 2, 2), jnp.bool_))

  @nn.compact
  def __call__(self, features: jax.Array, block: Optional[jax.Array],
               is_mask: Optional[jax.Array], positions: jax.Array, attention_mask: jax.Array,
               cache: Optional[KVCache] = None,
               write_slots: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """features: [B, C, F] raw target features of C context entries (F = feature_size);
    block: [B, M, D] the block entries' token embeddings (the target's) or None (context
    entries only: a prefill of the drafter's cache); is_mask: [B, M] bool, True where an
    entry is the mask token (its embedding replaced by the learned one);
    positions: [B, C + M] (context entries first); attention_mask: [B, C + M, S] bool,
    S = C + M without a cache, else the cache capacity (keys are cache slots);
    cache / write_slots: [B, C + M] the slots receiving the entries' keys/values (slots
    >= capacity are dropped); the cache's lengths are left as they are (the caller keeps
    what it decides to).

    Returns (the block's final hidden states [B, M, D] after the drafter's final norm,
    the input of the target's LM head, or [B, 0, D] without a block; the cache or None).
    """
    c = self.layer_config
    dtype, pdtype = c.activation_dtype, _DTYPES[c.param_dtype]
    d = c.d_model
    fc = self.param('fc', nn.with_logical_partitioning(
        nn.initializers.normal(self.feature_size ** -0.5), (None, 'embed')),
                    (self.feature_size, d), pdtype)
    mask_embedding = self.param('mask_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('embed',)), (d,), pdtype)
    context = jnp.einsum('BCF,FD->BCD', features.astype(dtype), fc.astype(dtype))
    context = RMSNorm(c.norm_eps, dtype, pdtype, name='hidden_norm')(context)
    num_context = features.shape[1]
    if block is None:
      h = jnp.zeros((features.shape[0], 0, d), dtype)
    else:
      h = jnp.where(is_mask[..., None], mask_embedding.astype(dtype), block.astype(dtype))
    kv = None if cache is None else (cache.k, cache.v)
    for layer in range(self.num_layers):
      out, kv = Block(c, name=f'layer_{layer}')(jnp.concatenate([context, h], axis=1),
                                                positions, attention_mask, kv, write_slots,
                                                layer)
      h = out[:, num_context:]
    h = RMSNorm(c.norm_eps, dtype, pdtype, name='final_norm')(h)
    return h, None if cache is None else cache.replace(k=kv[0], v=kv[1])
