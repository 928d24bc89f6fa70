"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference
Using Lookahead Decoding", ICML 2024): drafting without a drafter, as a proposer for the
one speculative round of decoding/driver.py.

Each round is ONE target call on two branches under one combined attention mask:

  lookahead branch (section 3.1): a 2-D window of W columns x (N - 1) levels. Level 0
    holds the oldest guesses, level N - 2 the newest; column j of level l sits at
    position root + j + l, and its first cell (level 0, column 0) is the root itself,
    so column j read upwards is a run of consecutive positions (the paper's diagonal).
    Node (l, j) attends to the committed prefix, level 0 of columns 0..j and levels
    1..l of column j (the paper's Figure 3 mask; the reference code's
    j_make_causal_mask_multilevel). The target's greedy prediction at (N - 2, j) is a
    new guess for position root + j + N - 1: one Jacobi iteration of every column.
    The N-gram (level 0 .. N - 2 of column j, then that prediction) goes into the
    n-gram pool, keyed by its first token; then the oldest level is dropped and the
    predictions become the newest (the window always moves one position per round,
    the reference's ALWAYS_FWD_ONE, however many tokens the round commits).
  verification branch (section 3.2): up to G n-grams of the pool whose first token is
    the root (the last committed token), their N - 1 following tokens as candidates.
    They are merged into a trie (a shared prefix is one node, distinct continuations
    are siblings), so `verify.tree_accept` walks them with the point-mass rule for
    deterministic candidates (draft_logp None): exact under greedy, lossless under
    sampling (the reference's sampling rule, with the residual after each rejected
    sibling). The window never depends on the round's acceptance randomness (its tokens
    are argmaxes of the target), so the proposal is independent of the verifier's key.

Layout of the Proposal's nodes (node i in cache slot root + i, at position
root + depths[i]): node 0 the root; nodes 1 .. G(N-1) the verification branch
(candidate g's token d at node 1 + g(N-1) + d, depth d + 1; duplicates of an earlier
candidate's prefix and empty pool entries get parent -1, so they are never candidates);
then the lookahead branch, level 0 columns 1..W-1 and levels 1..N-2 columns 0..W-1,
all with parent -1 (never candidates) and depth l + j. The lookahead nodes are written
into the cache past the accepted path; the driver moves the accepted path into sequence
order and keeps only that length, so their writes never reach a kept slot.

Choices the paper leaves open, and ours:
  * Window initialization: tokens drawn uniformly from the row's own prompt (the
    reference's default `copy_from`; random vocabulary ids would start the Jacobi
    trajectories far from anything the target predicts), with a fixed key so the same
    prompt gives the same window (the window affects speed, never the output).
  * Warm-up: the window has all N - 1 levels from the first round (fixed shapes), but
    levels 1..N-2 hold refined tokens (target outputs) only after N - 2 rounds; n-grams
    are harvested from then on, the point where the reference's level-by-level warm-up
    starts harvesting. Before that the pool is empty, so those rounds commit one token
    each, as the reference's warm-up steps do.
  * Pool: per row, dense over the vocabulary, [V, G, N - 1] tokens with a recency stamp
    per entry (fixed shapes on device). A harvested n-gram already present is
    refreshed; a new one fills an empty entry or replaces its key's least recently
    harvested one: the reference's LRU with GUESS_SET_SIZE = G. Memory per row:
    V * G * N * 4 bytes (SmolLM2, G=7, N=5: 6.9 MB).
  * The pool holds only n-grams that appeared in the window (the reference's default,
    POOL_FROM_PROMPT off): n-grams copied from the prompt are prompt lookup's job.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver, trees
from decoding.proposal import Proposal, Proposer
from decoding.sampling import mask_padded_vocab

# Defaults (launch.generation.DecodeOptions reads these): the paper's settings for a 7B
# model on one A100 are W=15, N=5, G=15; on a CPU every fed node costs about one token of
# compute, so the defaults feed (N - 1)(W + G) = 40 nodes per call.
DEFAULT_WINDOW, DEFAULT_NGRAM, DEFAULT_CANDIDATES = 5, 5, 5
# Ranges (one-line errors on the host before anything compiles).
MAX_WINDOW, MAX_NGRAM, MAX_CANDIDATES = 64, 16, 64


def check_settings(window: int, ngram: int, candidates: int) -> None:
  """Raises a one-line ValueError for W, N or G out of range: 1 <= W <= 64,
  2 <= N <= 16, 1 <= G <= 64 (beyond them a call feeds (N - 1)(W + G) nodes, far past
  what lookahead decoding gains from)."""
  for name, value, low, high in (('lookahead_window', window, 1, MAX_WINDOW),
                                 ('lookahead_ngram', ngram, 2, MAX_NGRAM),
                                 ('lookahead_candidates', candidates, 1, MAX_CANDIDATES)):
    if not isinstance(value, (int, np.integer)) or not low <= value <= high:
      raise ValueError(f'{name} must be an integer in [{low}, {high}], got {value!r}.')


@dataclasses.dataclass(frozen=True)
class LookaheadConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit).

  window: W, columns of the 2-D window; ngram: N, the n-gram size (N - 1 window levels,
  candidates of N - 1 tokens); candidates: G, pool entries per key, all verified each
  round. Raises ValueError (check_settings) when one is out of range.
  """
  window: int = DEFAULT_WINDOW
  ngram: int = DEFAULT_NGRAM
  candidates: int = DEFAULT_CANDIDATES

  def __post_init__(self):
    check_settings(self.window, self.ngram, self.candidates)

  @property
  def max_accepted(self) -> int:
    return self.ngram - 1

  def proposer(self, model, drafter) -> 'LookaheadProposer':
    del drafter
    return LookaheadProposer(self.window, self.ngram, self.candidates,
                             model.config.vocab_size)


@flax.struct.dataclass
class LookaheadState:
  """The proposer's state across rounds (per row b).

  window: [B, N - 1, W] int32, level l column j at position root + l + j (level 0
    column 0 is unused: the root takes its place).
  rounds: [] int32 rounds run so far (warm-up: harvesting starts at N - 2).
  pool: [B, V, G, N - 1] int32 the tokens after each key (V real vocabulary ids).
  stamp: [B, V, G] int32 when each entry was last harvested (0 = empty).
  """
  window: jax.Array
  rounds: jax.Array
  pool: jax.Array
  stamp: jax.Array


class LookaheadProposer(Proposer):
  """The lookahead and verification branches of Fu et al. (2024) (module docstring).

  Static layout attributes: `node_of` [N - 1, W] int, the proposal node of window cell
  (level, column) (node_of[0, 0] = 0, the root); `num_verify` = G (N - 1) verification
  nodes (1 .. num_verify); `num_nodes` = (N - 1)(W + G) in all.
  """

  def __init__(self, window: int, ngram: int, candidates: int, vocab_size: int):
    check_settings(window, ngram, candidates)
    self.window, self.ngram, self.candidates, self.vocab = window, ngram, candidates, vocab_size
    levels = ngram - 1
    self.num_verify = candidates * levels
    cells = [(0, j) for j in range(1, window)] + [
        (l, j) for l in range(1, levels) for j in range(window)]
    node_of = np.zeros((levels, window), np.int32)
    for k, (l, j) in enumerate(cells):
      node_of[l, j] = 1 + self.num_verify + k
    self.node_of = node_of
    self.num_nodes = 1 + self.num_verify + len(cells)
    # Depths: root 0; candidate token d at d + 1; window cell (l, j) at l + j.
    self.depths = np.concatenate([[0], np.tile(np.arange(1, levels + 1), candidates),
                                  [l + j for l, j in cells]]).astype(np.int32)
    # What each window cell attends to besides the committed prefix: level 0 of
    # columns 0..j (the root is column 0) and levels 1..l of its own column.
    relation = np.zeros((len(cells), self.num_nodes), bool)
    for k, (l, j) in enumerate(cells):
      relation[k, node_of[0, :j + 1]] = True
      relation[k, node_of[1:l + 1, j]] = True
    self.window_relation = relation
    self.max_depth = levels
    self.cache_slots = self.num_nodes - 1

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    """The window from uniform draws of each row's own prompt tokens; an empty pool."""
    del params, prefill, cache_size
    batch = prompts.shape[0]
    shape = (batch, self.ngram - 1, self.window)
    draws = jax.random.randint(jax.random.PRNGKey(0), shape, 0,
                               prompt_lengths[:, None, None].astype(jnp.int32))
    window = jnp.take_along_axis(prompts, draws.reshape(batch, -1), axis=1).reshape(shape)
    state = LookaheadState(
        window=window.astype(jnp.int32), rounds=jnp.zeros((), jnp.int32),
        pool=jnp.zeros((batch, self.vocab, self.candidates, self.ngram - 1), jnp.int32),
        stamp=jnp.zeros((batch, self.vocab, self.candidates), jnp.int32))
    return state, jnp.zeros((), jnp.int32)

  def candidate_tree(self, root: jax.Array, state: LookaheadState):
    """The verification branch: the pool's entries under each row's root, as a trie.

    root: [B] the last committed tokens. Returns (tokens [B, G (N-1)], parents
    [B, 1 + G (N-1)] over the root and these nodes: -1 for the root, for an empty
    entry's nodes and for a node that repeats an earlier candidate's prefix).
    """
    batch, levels, g = root.shape[0], self.ngram - 1, self.candidates
    rows = jnp.arange(batch)
    tokens = state.pool[rows, root]                                     # [B, G, N-1]
    valid = state.stamp[rows, root] > 0                                 # [B, G]
    same = jnp.cumprod(tokens[:, :, None] == tokens[:, None], axis=-1).astype(bool)
    same &= valid[:, :, None, None] & valid[:, None, :, None]           # [B, G, G, N-1]
    first = jnp.argmax(same, axis=2)                                    # [B, G, N-1]
    real = valid[:, :, None] & (first == jnp.arange(g)[None, :, None])
    # Token d's parent: the root, or the first candidate holding the same d tokens.
    parent = jnp.concatenate([jnp.zeros_like(first[..., :1]),
                              1 + first[..., :-1] * levels + jnp.arange(levels - 1)], axis=-1)
    parent = jnp.where(real, parent, -1).reshape(batch, -1)
    parents = jnp.concatenate([jnp.full((batch, 1), -1, parent.dtype), parent], axis=1)
    return tokens.reshape(batch, -1), parents.astype(jnp.int32)

  def propose(self, params, state: LookaheadState, loop_state, key):
    """-> (the round's Proposal: root, the verification trie, the window's cells; N =
    num_nodes nodes per row under the combined mask; the state unchanged; 0 drafter
    calls). Needs no key: candidates and window are deterministic."""
    del params, key
    batch = state.window.shape[0]
    rows = jnp.arange(batch)
    root = loop_state.tokens[rows, loop_state.lengths - 1]                 # [B]
    verify_tokens, verify_parents = self.candidate_tree(root, state)
    window_tokens = jnp.concatenate(
        [state.window[:, 0, 1:], state.window[:, 1:].reshape(batch, -1)], axis=1)
    tokens = jnp.concatenate([root[:, None], verify_tokens, window_tokens], axis=1)
    num_window = self.num_nodes - 1 - self.num_verify
    parents = jnp.concatenate(
        [verify_parents, jnp.full((batch, num_window), -1, jnp.int32)], axis=1)
    # The combined mask: the candidates' trie and the window's relation, disjoint but
    # for the root, which both branches see.
    verify_anc = trees.ancestors_from_parents(verify_parents, self.ngram - 1)
    top = jnp.concatenate([verify_anc, jnp.zeros((batch, 1 + self.num_verify, num_window),
                                                 bool)], axis=2)
    bottom = jnp.broadcast_to(jnp.asarray(self.window_relation),
                              (batch,) + self.window_relation.shape)
    proposal = Proposal(tokens=tokens.astype(jnp.int32), depths=jnp.asarray(self.depths)[None],
                        parents=parents, ancestors=jnp.concatenate([top, bottom], axis=1),
                        depth=self.ngram - 1, max_children=self.candidates)
    return proposal, state, jnp.zeros((), jnp.int32)

  def observe(self, params, state: LookaheadState, loop_state, verified, path, num_accepted):
    """One Jacobi step of the window from the target's logits on its newest level;
    the window's n-grams into the pool (after the warm-up); the window moves one level."""
    del params, path, num_accepted
    batch, levels = state.window.shape[0], self.ngram - 1
    rows = jnp.arange(batch)
    root = loop_state.tokens[rows, loop_state.lengths - 1]
    newest = verified.logits[:, jnp.asarray(self.node_of[levels - 1])]       # [B, W, V]
    guesses = jnp.argmax(mask_padded_vocab(newest, self.vocab), axis=-1).astype(jnp.int32)
    cells = state.window.at[:, 0, 0].set(root)
    grams = jnp.concatenate([jnp.swapaxes(cells, 1, 2), guesses[:, :, None]], axis=2)
    harvest = state.rounds >= levels - 1                                     # warm-up over
    pool, stamp = state.pool, state.stamp

    def insert(j, carry):  # n-gram j of every row, in column order (LRU as the reference)
      pool, stamp = carry
      key, gram = grams[:, j, 0], grams[:, j, 1:]                            # [B], [B, N-1]
      entries, stamps = pool[rows, key], stamp[rows, key]                    # [B, G, N-1]
      match = jnp.all(entries == gram[:, None], axis=-1) & (stamps > 0)      # [B, G]
      slot = jnp.where(jnp.any(match, axis=1), jnp.argmax(match, axis=1),
                       jnp.argmin(stamps, axis=1))
      now = state.rounds * self.window + j + 1
      gram = jnp.where(harvest, gram, entries[rows, slot])
      new_stamp = jnp.where(harvest, now, stamps[rows, slot])
      return pool.at[rows, key, slot].set(gram), stamp.at[rows, key, slot].set(new_stamp)

    pool, stamp = jax.lax.fori_loop(0, self.window, insert, (pool, stamp))
    # Drop the oldest level, append the guesses: level 0 takes level 1's tokens (its
    # column 0 becomes the next root's place).
    window = jnp.concatenate([state.window[:, 1:], guesses[:, None]], axis=1)
    return LookaheadState(window=window, rounds=state.rounds + 1, pool=pool, stamp=stamp)
