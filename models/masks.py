"""Boolean attention masks. `True` means the query may attend to the key.

Axis letters: B batch, T query length, S key length.

Every mask rule (causal, packed documents, cached decoding, draft trees, and later
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
  return slot_causal_mask(query_slot, capacity)


def slot_causal_mask(write_slots: jnp.ndarray, capacity: int) -> jnp.ndarray:
  """[B, T, S] causal mask over cache slots: the token written to slot
  write_slots[b, t] sees slots 0 .. write_slots[b, t] (a contiguous sequence whose
  slot is its position)."""
  return jnp.arange(capacity)[None, None, :] <= write_slots[:, :, None]


def tree_mask(ancestors: jnp.ndarray, root_slots: jnp.ndarray, capacity: int) -> jnp.ndarray:
  """[B, T, S] mask for feeding T draft-tree nodes into a cache whose root sits at
  root_slots [B] and whose node i sits at slot root + i: a node sees the committed
  prefix (slots < root) and its ancestors, itself included (the tree attention of
  SpecInfer, Miao et al. 2024, and Medusa, Cai et al. 2024).

  ancestors: [T, N] (one tree for every row) or [B, T, N] bool, the fed nodes' rows of
  the ancestor matrix (decoding/trees.py).
  """
  num_nodes = ancestors.shape[-1]
  ancestors = jnp.broadcast_to(ancestors, (root_slots.shape[0],) + ancestors.shape[-2:])
  relative = jnp.arange(capacity)[None] - root_slots[:, None]              # [B, S]
  in_tree = (relative >= 0) & (relative < num_nodes)
  tree_part = jnp.take_along_axis(
      ancestors, jnp.clip(relative, 0, num_nodes - 1)[:, None, :], axis=2)  # [B, T, S]
  return (relative < 0)[:, None, :] | (tree_part & in_tree[:, None, :])


def sliding_window_mask(mask: jnp.ndarray, query_positions: jnp.ndarray,
                        key_positions: jnp.ndarray, window: int) -> jnp.ndarray:
  """[B, T, S] `mask` restricted to a sliding window (Mistral): the query at position p
  sees only keys at positions > p - window. The window is a rule on positions, not
  slots, so a draft-tree node (slot root + i, position root + depth) keeps its exact
  window under a tree mask.

  query_positions: [B, T]; key_positions: [B, S] the position held by each key (with a
  cache: the slot for committed tokens, this call's positions at its write slots).
  """
  return mask & (key_positions[:, None, :] > query_positions[:, :, None] - window)
