"""Boolean attention masks. `True` means the query may attend to the key.

Axis letters: B batch, T query length, S key length.

Every mask rule (causal, packed documents, cached decoding, draft trees, block-causal
and BD3-LM training, and later any-order masks) is just an array of shape [B, T, S]
handed to the one attention code path.
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


def block_causal_mask(length: int, block_size: int) -> jnp.ndarray:
  """[T, T] block-causal mask: bidirectional inside each block of `block_size` tokens,
  causal across blocks (query in block b sees keys in blocks <= b). block_size = 1 is
  the causal mask; block_size = T is full attention."""
  block = jnp.arange(length) // block_size
  return block[None, :] <= block[:, None]


def bd3lm_training_mask(segment_ids: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """[B, 2T, 2T] the BD3-LM training mask over the noised sequence x_t concatenated with
  the clean one x_0 (Arriola et al. 2025, "Block Diffusion", section 3.2 and Fig. 2:
  M = [[M_BD, M_OBC], [0, M_BC]]), restricted to each packed document:
    x_t block b -> x_t block b (block-diagonal, bidirectional inside the noised block)
                 -> x_0 blocks < b (offset block-causal: the clean context);
    x_0 block b -> x_0 blocks <= b (block-causal, what the KV cache holds at sampling);
    x_0 -> x_t never.
  segment_ids: [B, T] int document ids (0 = padding), shared by both halves.
  """
  length = segment_ids.shape[1]
  block = jnp.arange(length) // block_size
  same_block = block[:, None] == block[None, :]
  before = block[None, :] < block[:, None]
  upto = block[None, :] <= block[:, None]
  top = jnp.concatenate([same_block, before], axis=1)                      # x_t queries
  bottom = jnp.concatenate([jnp.zeros_like(upto), upto], axis=1)           # x_0 queries
  rule = jnp.concatenate([top, bottom], axis=0)                            # [2T, 2T]
  seg = jnp.concatenate([segment_ids, segment_ids], axis=1)                # [B, 2T]
  same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
  return rule[None] & same_doc


def block_slot_mask(block_starts: jnp.ndarray, block_size: int, capacity: int) -> jnp.ndarray:
  """[B, block_size, S] the mask of one block fed into a cache: every token of row b's
  block at slots block_starts[b] .. + block_size - 1 sees the cached clean blocks
  (slots < block_starts[b]) and the whole block (bidirectional). What BD3-LM sampling
  uses for both the noised block and the finished clean block's KV write."""
  ends = block_starts + block_size                                          # [B]
  visible = jnp.arange(capacity)[None, :] < ends[:, None]                   # [B, S]
  return jnp.broadcast_to(visible[:, None, :], (block_starts.shape[0], block_size, capacity))


def training_time_test_mask(segment_ids: jnp.ndarray, step: int, steps: int) -> jnp.ndarray:
  """The attention of training-time test step `step` (0-based) over all steps' keys, laid
  out as a cache of `steps` x T slots (slot j * T + s = step j's entry at position s).

  segment_ids: [B, T] packed documents (0 = padding). Step j's entry at t is a depth-j
  draft whose root is the committed entry t, so at decoding time it sees the committed
  entries 0 .. t of its document (step 0's keys, causal) and its own ancestors, the
  entries of steps 1 .. j at the same t (the diagonal): the tree mask of EAGLE-2
  drafting, in one call per step (EAGLE-3, section 3.2, figure 6). Returns [B, T,
  steps * T] bool.
  """
  length = segment_ids.shape[1]
  causal = packed_causal_mask(segment_ids)                              # [B, T, T]
  diagonal = jnp.broadcast_to(jnp.eye(length, dtype=bool), causal.shape)
  parts = [causal] + [diagonal if 1 <= j <= step else jnp.zeros_like(causal)
                      for j in range(1, steps)]
  return jnp.concatenate(parts, axis=-1)


def tidar_training_mask(segment_ids: jnp.ndarray, block_size: int) -> jnp.ndarray:
  """[B, 2T, 2T] the TiDAR training mask over the clean sequence x concatenated with a
  fully masked copy (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in
  Autoregression", section 3 and its attention-mask figure), restricted to each packed
  document:
    x  -> x causal (the autoregressive part: next-token prediction);
    mask block b -> x at positions < b * block_size (the clean prefix before the block)
                 -> mask block b (bidirectional inside the block: the diffusion draft);
    x -> masks never.
  Unlike bd3lm_training_mask the clean half is causal, not block-causal: the same
  forward is the model's autoregressive LM. segment_ids: [B, T] document ids (0 = pad).
  """
  length = segment_ids.shape[1]
  index = jnp.arange(length)
  block = index // block_size
  causal = index[None, :] <= index[:, None]
  prefix = index[None, :] < (block * block_size)[:, None]                 # key before block
  same_block = block[:, None] == block[None, :]
  top = jnp.concatenate([causal, jnp.zeros_like(causal)], axis=1)         # clean queries
  bottom = jnp.concatenate([prefix, same_block], axis=1)                  # mask queries
  rule = jnp.concatenate([top, bottom], axis=0)                           # [2T, 2T]
  seg = jnp.concatenate([segment_ids, segment_ids], axis=1)               # [B, 2T]
  same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
  return rule[None] & same_doc


def tidar_round_mask(root_slots: jnp.ndarray, num_draft: int, capacity: int) -> jnp.ndarray:
  """[B, N, S] the mask of one TiDAR decoding call (Liu et al. 2025, section 3.3): N =
  (k + 1) + (k + 1)^2 queries, k = num_draft, over the cache slots S.

  Queries 0 .. k are the causal part: the root (the last committed token, slot root) and
  the k drafted tokens at slots root + 1 .. root + k, each seeing the slots up to its own
  (verification, autoregressive). Then k + 1 blocks of k + 1 mask tokens, block i at
  slots root + (k + 1) * (i + 1) .. + k: the next round's draft should the verifier
  accept i drafts; it sees the committed prefix, the root and drafts 1 .. i (slots <=
  root + i) and its own block (bidirectional), as in training (tidar_training_mask).
  root_slots: [B] int.
  """
  k1 = num_draft + 1
  slots = jnp.arange(capacity)[None, None, :]                               # [1, 1, S]
  root = root_slots[:, None, None]
  causal = slots <= root + jnp.arange(k1)[None, :, None]                    # [B, k+1, S]
  outcome = jnp.repeat(jnp.arange(k1), k1)[None, :, None]                   # [1, k1^2, 1]
  start = root + k1 * (outcome + 1)
  blocks = (slots <= root + outcome) | ((slots >= start) & (slots < start + k1))
  return jnp.concatenate([causal, blocks], axis=1)
def any_order_training_mask(ranks: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
  """[B, 2T, 2T] the two-stream mask of an any-subset autoregressive model (AS-ARM; Guo and
  Ermon 2025, after XLNet's two-stream attention, Yang et al. 2019, section 2.3) over the
  content stream (this row's T tokens) concatenated with the query stream (T [MASK]
  tokens at the same positions), restricted to each packed document.

  ranks: [B, T] int, 0 for a known (conditioning) token, 1, 2, ... for the tokens to
  predict in their decoding order (ties are not allowed among ranks > 0); segment_ids:
  [B, T] document ids (0 = padding).
    content i -> content j  iff rank_j == 0 or rank_j <= rank_i: the known tokens see each
                 other (bidirectional, as the reference code's prompt does) and a predicted
                 token's content sees the known set and the tokens decoded up to itself;
    query i   -> content j  iff rank_j < rank_i (the known set and the tokens decoded
                 before i), and -> query i itself (its own position, never its token);
    content   -> query      never.
  The query stream's output at i is then p(x_i | x_{rank < rank_i}), and the content
  stream holds exactly the keys/values a KV cache keeps while decoding in that order.
  """
  length = ranks.shape[1]
  rq, rk = ranks[:, :, None], ranks[:, None, :]
  same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, :, None]
  content = ((rk == 0) | (rk <= rq)) & same_doc
  query = (rk < rq) & same_doc
  own = jnp.broadcast_to(jnp.eye(length, dtype=bool), content.shape)
  none = jnp.zeros_like(content)
  top = jnp.concatenate([content, none], axis=2)                           # content queries
  bottom = jnp.concatenate([query, own], axis=2)                           # query stream
  return jnp.concatenate([top, bottom], axis=1)


def any_order_slot_mask(visible: jnp.ndarray, write_slots: jnp.ndarray,
                        within: jnp.ndarray) -> jnp.ndarray:
  """[B, T, S] the mask of one cached call of an any-order model whose T tokens sit at
  arbitrary cache slots: token t sees every slot `visible` marks (the tokens already kept,
  at non-contiguous slots) and, of this call's tokens, those `within` allows.

  visible: [B, S] bool per-slot validity; write_slots: [B, T] this call's slots (>= S =
  not written, seen by nobody); within: [T, T] or [B, T, T] bool, query t -> this
  call's token u.
  """
  capacity = visible.shape[1]
  at = write_slots[:, :, None] == jnp.arange(capacity)[None, None, :]       # [B, T, S]
  within = jnp.broadcast_to(within, write_slots.shape + write_slots.shape[1:])
  in_call = jnp.einsum('btu,bus->bts', within.astype(jnp.int32), at.astype(jnp.int32)) > 0
  return visible[:, None, :] | in_call
