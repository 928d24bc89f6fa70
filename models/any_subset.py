"""Any-subset autoregressive LM (AS-ARM; Guo and Ermon 2025, "Reviving Any-Subset
Autoregressive Models with Principled Parallel Sampling and Speculative Decoding").

An AS-ARM predicts the token at any requested position given any set of known positions,
and factorizes a joint over the unknown positions in any chosen order:
    p(x_U | x_K) = prod_i p(x_{u_i} | x_K, x_{u_1} .. x_{u_{i-1}}).
The reference model is XLNet with two-stream attention (Yang et al. 2019): a content
stream carries each known token, a query stream carries only a target position. This
trunk implements the same thing with the one Transformer (models/transformer.py) and a
vocabulary extended by one id, [MASK] = config.vocab_size - 1:

  content stream  the known / decoded tokens, each at its own position (rotary), seeing
                  the known set (bidirectionally) and the tokens decoded before it;
  query stream    a [MASK] token at each requested position: it sees the content of
                  the tokens before it in the order and itself (its position only), and
                  is never a key for anything else; its output is the prediction.

This is XLNet's query stream with the query's state at layer 0 the [MASK] embedding
(XLNet: a learned vector w; the same thing) and its own key/value as the one
non-content key it reads (XLNet's query reads only content keys; reading its own as well
keeps a query with an empty context well defined, and it carries no token). Because a
query never feeds any other token, one forward can hold many queries: k marginals in
one call (ASSD's draft), or the k conditionals of a drafted chain (its verification).
The masks are models/masks.any_order_training_mask (training, no cache) and
any_order_slot_mask (decoding: keys at non-contiguous cache slots).
"""
import jax
import jax.numpy as jnp

from models import masks
from models.transformer import Transformer


class AnySubsetLM(Transformer):
  """A Transformer trained as an AS-ARM. config.vocab_size is the tokenizer's
  vocabulary plus one: the query token [MASK] is `mask_id` = config.vocab_size - 1."""

  @property
  def mask_id(self) -> int:
    return self.config.vocab_size - 1

  def prediction_logits(self, logits: jax.Array) -> jax.Array:
    """[..., V] -> float32 [..., V] with [MASK] and the padded ids at -inf (a query never
    predicts [MASK])."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < self.mask_id, logits.astype(jnp.float32), -jnp.inf)

  def training_logits(self, tokens: jax.Array, positions: jax.Array, ranks: jax.Array,
                      segment_ids: jax.Array) -> jax.Array:
    """The two-stream training forward: one call over the content stream (tokens) and
    the query stream ([MASK] at the same positions) under
    masks.any_order_training_mask.

    tokens, positions, ranks, segment_ids: [B, T] (ranks: 0 = known, 1, 2, ... the
    decoding order of the rest). Returns [B, T, V] float32 prediction logits of the
    query stream: row t is p(x_t | the tokens of rank < rank_t) (meaningful where
    rank_t > 0). Cost: one forward over 2T tokens.
    """
    queries = jnp.full_like(tokens, self.mask_id)
    both = jnp.concatenate([tokens, queries], axis=1)
    both_positions = jnp.concatenate([positions, positions], axis=1)
    mask = masks.any_order_training_mask(ranks, segment_ids)
    x, _, _ = self.blocks(self.embed(both), both_positions, mask)
    return self.prediction_logits(self.head(x[:, tokens.shape[1]:]))
