"""Draft heads that read the target's own hidden states.

Medusa (Cai et al. 2024): K heads on the last hidden state h_t (after the final norm);
head k (1-based) predicts token t + k + 1, one step further than the LM head does:

    logits_k = W_k^T (h_t + SiLU(A_k h_t + b_k))        A_k: [D, D], W_k: [D, V]

A_k starts at zero and W_k at the target's LM head, so before training every head
predicts what the LM head predicts (the paper's initialisation).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from models.transformer import TransformerConfig


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
  if config.tie_embeddings:
    return target_params['embedding'].T
  return target_params['lm_head']
