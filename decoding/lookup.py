"""Prompt lookup (n-gram) drafting: the row's own tokens are the drafter.

Prompt lookup decoding (Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding; in
transformers as `prompt_lookup_num_tokens` / `max_matching_ngram_size`): the last n
tokens of a row (n from max_ngram down to min_ngram) are searched for in the row's
prompt and generated tokens; the K tokens that followed a match are the draft. No
draft model, no training: it pays off where the answer copies from the input
(summarization, code editing, retrieval QA) and costs one wider target call elsewhere.

Here the search runs on device over the driver's token buffer (`loop_state.tokens`
[B, S], `lengths` [B]), vectorized: max_ngram shifted comparisons of the whole buffer
with the row's suffix, no host round trip, no per-token Python loop. The drafts are
deterministic candidates (Proposal.draft_logp None), so the verifier's point-mass rule
keeps greedy exact and sampling lossless (decoding/verify.py).

Choices where the reference leaves room (written down as the guide asks):
  * Which match: transformers and Saxena's code take the FIRST match from the left
    (the order `nonzero()` returns, not a tested choice). We take the longest n, then
    the MOST RECENT match: the nearest earlier occurrence of the suffix is the one the
    text is most likely following now (the current copy source when an edit copies a
    passage, the current period of a loop a greedy model has fallen into).
  * Overlapping matches: a match ending d <= K tokens before the end (a run "aaaa", a
    short loop) has only d tokens after it; transformers drafts just those. The
    n-gram match says the text repeats with period d there, so we continue the period
    (draft j = tokens[e + 1 + (j mod d)]) and still draft K tokens.
  * A row with no match drafts nothing that round (num_drafted 0): its round is a plain
    autoregressive step inside the same target call.
  * Drafts never pass the row's limit (prompt + max_new_tokens, or the buffer /
    cache capacity): num_drafted <= limits - lengths - 1, so no drafted token sits past
    a slot the commit rule could keep.
  * branches M > 1: the M best matches (longest n, then most recent) as a tree whose
    distinct continuations are siblings (a trie of M chains of K, shared prefixes
    merged; deterministic candidates: SpecInfer's point-mass rule).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver, trees
from decoding.proposal import Proposal, Proposer

MAX_NGRAM = 16      # longest n-gram searched (each n is one shifted compare of the buffer)
MAX_BRANCHES = 16   # most matches one tree holds


@dataclasses.dataclass(frozen=True)
class LookupConfig(driver.DecodeConfig):
  """Static settings of prompt lookup decoding (hashable: a static argument of jit)."""
  num_draft: int = 4         # K: tokens drafted after a match, at most
  max_ngram: int = 3         # longest suffix n-gram matched (transformers' default is 2)
  min_ngram: int = 1         # shortest; a row whose suffix matches no n >= this drafts nothing
  branches: int = 1          # M matches per round: 1 = a chain, > 1 = a tree of M chains

  def __post_init__(self):
    if self.num_draft < 1:
      raise ValueError(f'num_draft must be >= 1, got {self.num_draft}.')
    if not 1 <= self.min_ngram <= self.max_ngram <= MAX_NGRAM:
      raise ValueError(f'lookup n-gram sizes must satisfy 1 <= lookup_min_ngram <= '
                       f'lookup_max_ngram <= {MAX_NGRAM}, got min {self.min_ngram}, '
                       f'max {self.max_ngram}.')
    if not 1 <= self.branches <= MAX_BRANCHES:
      raise ValueError(f'lookup_branches must be in [1, {MAX_BRANCHES}], got {self.branches}.')

  def proposer(self, model, drafter) -> 'LookupProposer':
    del model, drafter
    return LookupProposer(self)


def draft_room(loop_state, k: int) -> jax.Array:
  """[B] int32 how many tokens a row may draft this round, at most k: the commit rule
  keeps at most limits - lengths tokens (the drafted ones and the target's next), so
  drafting more than limits - lengths - 1 would only score slots that are never kept
  (or lie past the buffer / cache capacity). 0 for finished rows."""
  room = jnp.clip(loop_state.limits - loop_state.lengths - 1, 0, k)
  return jnp.where(loop_state.done, 0, room).astype(jnp.int32)


def match_lengths(tokens: jax.Array, lengths: jax.Array, max_ngram: int) -> jax.Array:
  """For every end e of the buffer, how long a suffix of the row matches there.

  tokens: [B, S] int32 buffers (row b's tokens are tokens[b, :lengths[b]]); lengths:
  [B] int32. Returns [B, S] int32: the largest n <= max_ngram with
  tokens[e - n + 1 : e + 1] == tokens[L - n : L] (L = lengths[b]), for e <= L - 2 (a
  match must have at least one token after it); 0 where none. max_ngram shifted
  compares of the whole buffer, O(max_ngram * B * S), on device.
  """
  batch, size = tokens.shape
  rows, ends = jnp.arange(batch), jnp.arange(size)[None]
  run = jnp.ones((batch, size), bool)
  count = jnp.zeros((batch, size), jnp.int32)
  for i in range(max_ngram):  # Compare tokens[e - i] with the suffix's tokens[L - 1 - i].
    shifted = jnp.pad(tokens, ((0, 0), (i, 0)))[:, :size]
    suffix = tokens[rows, jnp.maximum(lengths - 1 - i, 0)]
    run = run & (shifted == suffix[:, None]) & (ends >= i)
    count = count + run.astype(jnp.int32)
  return jnp.where(ends <= lengths[:, None] - 2, count, 0)


def find_drafts(tokens: jax.Array, lengths: jax.Array, num_draft: int, max_ngram: int,
                min_ngram: int, num_matches: int = 1):
  """The num_matches best matches of each row's suffix and the tokens after them.

  Best = longest n-gram (>= min_ngram), then most recent. tokens: [B, S]; lengths [B].
  Returns (drafts [B, M, K] int32: the K tokens after each match, continuing the
  period d = L - 1 - e where the match ends d <= K tokens before the end; found [B, M]
  bool: a match exists (drafts are 0 where not)).
  """
  size = tokens.shape[1]
  count = match_lengths(tokens, lengths, max_ngram)
  ends = jnp.arange(size)[None]
  score = jnp.where(count >= min_ngram, count * size + ends, -1)          # [B, S]
  best, end = jax.lax.top_k(score, min(num_matches, size))                # [B, M]
  if num_matches > size:  # A buffer shorter than M holds fewer matches.
    best = jnp.pad(best, ((0, 0), (0, num_matches - size)), constant_values=-1)
    end = jnp.pad(end, ((0, 0), (0, num_matches - size)))
  found = best >= 0
  period = jnp.maximum(lengths[:, None] - 1 - end, 1)                     # [B, M]
  index = end[..., None] + 1 + jnp.arange(num_draft) % period[..., None]  # [B, M, K]
  drafts = jnp.take_along_axis(tokens[:, None], jnp.minimum(index, size - 1), axis=2)
  return jnp.where(found[..., None], drafts, 0).astype(jnp.int32), found


def match_tree(drafts: jax.Array, found: jax.Array, room: jax.Array):
  """The trie of M drafted chains, distinct continuations as siblings.

  drafts: [B, M, K]; found: [B, M]; room: [B] the most tokens a row may draft.
  Nodes in level order: node 1 + j * M + m is chain m's token j (depth j + 1). A node
  is live iff its chain was found, it lies within `room`, and no earlier chain shares
  its prefix up to it (the first such chain holds the shared node); a live node's
  parent is the node holding its prefix one level up. Dead nodes get parent -2 (never
  anyone's child: the verifier skips them; their target scores are unused).
  Returns (node tokens [B, N - 1], parents [B, N] with parents[:, 0] = -1), N = 1 + M K.
  """
  batch, m, k = drafts.shape
  chain = jnp.arange(m)
  same = jnp.ones((batch, m, m), bool) & found[:, None, :]              # prefix agrees so far
  parents, holder = [], jnp.zeros((batch, m), jnp.int32)                 # holder: node index
  for j in range(k):
    same = same & (drafts[:, :, None, j] == drafts[:, None, :, j])
    first = jnp.argmax(same, axis=2)                                       # [B, M] canonical
    live = found & (first == chain[None]) & (j < room[:, None])
    parent = jnp.zeros((batch, m), jnp.int32) if j == 0 else jnp.take_along_axis(
        holder, first, axis=1)
    parents.append(jnp.where(live, parent, -2))
    holder = 1 + j * m + first          # the node that holds each chain's prefix through j
  parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32)] +
                            [p.astype(jnp.int32) for p in parents], axis=1)
  tokens = jnp.transpose(drafts, (0, 2, 1)).reshape(batch, k * m)
  return tokens, parents


class LookupProposer(Proposer):
  """Drafts from the row's own token buffer (see the module docstring); no state."""

  def __init__(self, config: LookupConfig):
    self.config = config
    self.max_depth = config.num_draft
    self.cache_slots = 0 if config.branches == 1 else 1 + config.branches * config.num_draft
    # Level-order node depths of the M-chain trie: root 0, then K levels of M nodes.
    self._depths = np.concatenate([[0], np.repeat(np.arange(1, config.num_draft + 1),
                                                  config.branches)]).astype(np.int32)

  def propose(self, params, state, loop_state, key):
    del params, key
    config = self.config
    rows = jnp.arange(loop_state.tokens.shape[0])
    root = loop_state.tokens[rows, loop_state.lengths - 1]
    drafts, found = find_drafts(loop_state.tokens, loop_state.lengths, config.num_draft,
                                config.max_ngram, config.min_ngram, config.branches)
    room = draft_room(loop_state, config.num_draft)
    if config.branches == 1:
      proposal = Proposal.chain(root, drafts[:, 0],
                                num_drafted=jnp.where(found[:, 0], room, 0))
    else:
      node_tokens, parents = match_tree(drafts, found, room)
      proposal = Proposal(
          tokens=jnp.concatenate([root[:, None], node_tokens], axis=1).astype(jnp.int32),
          depths=jnp.asarray(self._depths)[None], parents=parents,
          ancestors=trees.ancestors_from_parents(parents, config.num_draft),
          depth=config.num_draft, max_children=config.branches)
    return proposal, state, jnp.zeros((), jnp.int32)
