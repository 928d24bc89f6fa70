"""Boolean attention masks. `True` means the query may attend to the key.

Axis letters: B batch, T query length, S key length.

Every mask rule (causal, packed documents, cached decoding, and later trees,
block-causal and any-order masks) is just an array of shape [B, T, S] handed to
the one attention code path.
"""
import jax.numpy as jnp


def causal_mask(batch_size: int, length: int) -> jnp.ndarray:
  """[B, T, T]: query t sees keys 0..t."""
  mask = jnp.tril(jnp.ones((length, length), dtype=bool))
  return jnp.broadcast_to(mask, (batch_size, length, length))


def packed_causal_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """[B, T, T] causal mask that stays inside each packed document.

  segment_ids: [B, T] int, equal within a document, 0 for padding.
  """
  length = segment_ids.shape[1]
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, :, None]
  return same_doc & real & jnp.tril(jnp.ones((length, length), dtype=bool))[None]


def cache_causal_mask(lengths: jnp.ndarray, num_queries: int, capacity: int) -> jnp.ndarray:
  """[B, T, S] causal mask for T new tokens written after each row's cached prefix.

  Row b's new token t sits in cache slot lengths[b] + t and sees slots
  0 .. lengths[b] + t.

  lengths: [B] int, valid cache slots per row before this call.
  """
  query_slot = lengths[:, None] + jnp.arange(num_queries)[None, :]           # [B, T]
  return jnp.arange(capacity)[None, None, :] <= query_slot[:, :, None]       # [B, T, S]
