"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Each round of one `lax.while_loop`:
  1. the draft proposes up to K tokens autoregressively (an inner while_loop; with an
     adaptive threshold a row stops drafting after a token the draft itself is unsure
     of, and the loop ends when every row has stopped), or a static tree of tokens
     level by level (decoding/trees.py);
  2. the target scores [last token, d_1 .. d_K] (or every tree node, with a tree
     attention mask) in one forward call;
  3. `verify.chain_accept` (`verify.tree_accept`) keeps a prefix d_1 .. d_n per row (a
     root-to-node path, whose keys/values then move into sequence order) and adds one
     target token;
  4. each row commits its own n + 1 tokens (cut at an EOS id or the row's limit); the
     caches keep only what was committed by setting their lengths.

Rows advance by their own amounts: per-row lengths in the token buffer and both caches.

Cache invariant at the start of a round (L = lengths[b], the buffer's token count):
the target cache holds tokens[:L - 1] and the draft cache tokens[:L - 2] at least.
The draft's first call feeds the last two tokens (positions L - 2 and L - 1), so it is
complete whether the previous round accepted everything or not; rewriting slot L - 2
with the same token and context is harmless.
"""
import dataclasses
import functools
from typing import Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoding import base, trees, verify
from decoding.sampling import SamplingConfig, log_probs
from models import KVCache


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Static settings (hashable: a static argument of jit)."""
  max_new_tokens: int
  cache_capacity: int                      # S: prompt + new tokens per row must fit
  num_draft: int = 4                       # K: drafted tokens per round, at most
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = (2,)
  # SpecDec++-style stopping: a row stops drafting after a token whose probability under
  # the draft's raw (temperature 1, unfiltered) distribution is below this. 0 = off.
  # That token is still verified: dropping a token because of its own probability
  # would draw it from q(x | confident) while the verifier divides by q(x), a biased
  # rule. Deciding only whether to draft the *next* token keeps every draft ~ q.
  adaptive_threshold: float = 0.0
  # A draft tree instead of a chain (num_draft is then ignored); the target verifies
  # the whole tree in one call. TreeSpec: a static shape; the draft expands branching[d]
  # children per node at depth d (its top-k under greedy, i.i.d. draws from its
  # distribution when sampling, as SpecInfer's multi-candidate rule requires).
  # DynamicTreeSpec: EAGLE-2's tree, grown and pruned by the draft's cumulative
  # log-probabilities; children are the draft's top-k (distinct) tokens, greedy or not.
  tree: Optional[Union[trees.TreeSpec, trees.DynamicTreeSpec]] = None

  def __post_init__(self):
    if self.num_draft < 1:
      raise ValueError(f'num_draft must be >= 1, got {self.num_draft}.')
    if not 0 <= self.adaptive_threshold < 1:
      raise ValueError(f'adaptive_threshold must be in [0, 1), got {self.adaptive_threshold}.')
    if self.tree is not None and self.adaptive_threshold > 0:
      raise ValueError('adaptive_threshold applies to chains; a tree has a fixed shape.')

  @property
  def max_accepted(self) -> int:
    return self.tree.depth if self.tree is not None else self.num_draft

  @property
  def cache_slack(self) -> int:
    """Spare cache slots: tree node i sits in slot root + i, past its position root +
    depth(i), so a tree near the end of the buffer needs room beyond it."""
    return self.tree.cache_slots if self.tree is not None else 0


@flax.struct.dataclass
class State:
  tokens: jax.Array        # [B, S] int32 buffer: prompt then committed tokens
  lengths: jax.Array       # [B] int32 tokens in the buffer
  limits: jax.Array        # [B] int32 buffer length at which a row stops
  target_cache: KVCache    # holds tokens[:, :lengths - 1]
  draft_cache: KVCache     # chain, static tree: holds at least tokens[:, :lengths - 2];
                           # dynamic tree: holds tokens[:, :draft_cache.lengths]
  done: jax.Array          # [B] bool
  rng: jax.Array
  target_calls: jax.Array  # [] int32
  draft_calls: jax.Array   # [] int32
  histogram: jax.Array     # [K + 1] int32 row-rounds by number of accepted drafts


@flax.struct.dataclass
class Draft:
  """The inner drafting loop's state."""
  step: jax.Array          # [] int32 tokens drafted so far
  logits: jax.Array        # [B, V] the draft's logits for the next token
  cache: KVCache
  tokens: jax.Array        # [B, K] int32
  logp: jax.Array          # [B, K, V] processed draft distributions the tokens came from
  num_drafted: jax.Array   # [B] int32
  drafting: jax.Array      # [B] bool: row still drafting
  calls: jax.Array         # [] int32


def _draft(draft_model, draft_params, state: State, config: SpeculativeConfig, rng) -> Draft:
  """Proposes up to K tokens per row with the draft model."""
  batch = state.tokens.shape[0]
  rows = jnp.arange(batch)
  k, vocab = config.num_draft, draft_model.config.vocab_size
  two = state.lengths[:, None] + jnp.array([-2, -1])                      # [B, 2] positions
  out = draft_model.apply({'params': draft_params}, state.tokens[rows[:, None], two], two,
                          cache=state.draft_cache.replace(lengths=state.lengths - 2))
  padded_vocab = out.logits.shape[-1]
  init = Draft(step=jnp.zeros((), jnp.int32), logits=out.logits[:, -1], cache=out.cache,
               tokens=jnp.zeros((batch, k), jnp.int32),
               logp=jnp.zeros((batch, k, padded_vocab), jnp.float32),
               num_drafted=jnp.zeros((batch,), jnp.int32), drafting=~state.done,
               calls=jnp.ones((), jnp.int32))

  def body(d: Draft) -> Draft:
    logp = log_probs(d.logits, config.sampling, vocab)                       # [B, V]
    token = jax.random.categorical(jax.random.fold_in(rng, d.step), logp).astype(jnp.int32)
    drafting = d.drafting
    if config.adaptive_threshold > 0:
      raw = jax.nn.log_softmax(d.logits[:, :vocab], axis=-1)
      drafting &= raw[rows, token] >= jnp.log(config.adaptive_threshold)
    d = d.replace(tokens=d.tokens.at[:, d.step].set(token), logp=d.logp.at[:, d.step].set(logp),
                  num_drafted=d.num_drafted + d.drafting.astype(jnp.int32), drafting=drafting,
                  step=d.step + 1)

    def feed(d: Draft) -> Draft:  # The draft's logits after this token, for the next step.
      position = (state.lengths + d.step - 1)[:, None]
      out = draft_model.apply({'params': draft_params}, token[:, None], position, cache=d.cache)
      return d.replace(logits=out.logits[:, 0], cache=out.cache, calls=d.calls + 1)

    more = (d.step < k) & jnp.any(d.drafting)
    return jax.lax.cond(more, feed, lambda d: d, d)

  return jax.lax.while_loop(lambda d: (d.step < k) & jnp.any(d.drafting), body, init)


def _draft_tree(draft_model, draft_params, state: State, config: SpeculativeConfig, rng):
  """Expands the static tree level by level with the draft: one call per level.

  Returns (node_tokens [B, N], logp [B, N, V] the distribution each node's children
  were drawn from, the draft cache with the nodes of depth < D written, calls).
  """
  spec, sampling = config.tree, config.sampling
  batch, vocab = state.tokens.shape[0], draft_model.config.vocab_size
  rows = jnp.arange(batch)
  root = state.lengths - 1                                                    # [B] slot
  two = state.lengths[:, None] + jnp.array([-2, -1])
  out = draft_model.apply({'params': draft_params}, state.tokens[rows[:, None], two], two,
                          cache=state.draft_cache.replace(lengths=state.lengths - 2))
  cache, level_logits = out.cache, out.logits[:, -1:]                     # [B, 1, V]
  node_tokens = jnp.zeros((batch, spec.num_nodes), jnp.int32).at[:, 0].set(
      state.tokens[rows, root])
  logp = jnp.zeros((batch, spec.num_nodes, out.logits.shape[-1]), jnp.float32)
  starts = spec.level_starts
  for depth, width in enumerate(spec.branching):
    level = log_probs(level_logits, sampling, vocab)                        # [B, n_d, V]
    logp = logp.at[:, starts[depth]:starts[depth + 1]].set(level)
    if sampling.greedy:  # The draft's top-k distinct tokens.
      masked = jnp.where(jnp.arange(level.shape[-1]) < vocab, level_logits, -jnp.inf)
      children = jax.lax.top_k(masked, width)[1]                           # [B, n_d, k]
    else:  # i.i.d. draws from q, as SpecInfer's multi-candidate rule requires.
      children = jax.random.categorical(jax.random.fold_in(rng, depth), level[:, :, None],
                                        shape=level.shape[:2] + (width,))
    node_tokens = node_tokens.at[:, starts[depth + 1]:starts[depth + 2]].set(
        children.reshape(batch, -1).astype(jnp.int32))
    if depth + 1 < spec.depth:  # The new level's logits propose the next one.
      nodes = slice(starts[depth + 1], starts[depth + 2])
      out = draft_model.apply(
          {'params': draft_params}, node_tokens[:, nodes],
          root[:, None] + jnp.asarray(spec.depths[nodes])[None],
          trees.tree_mask(spec.ancestors[nodes], root, cache.capacity),
          cache.replace(lengths=root + nodes.start))
      cache, level_logits = out.cache, out.logits
  return node_tokens, logp, cache, spec.depth


def draft_scores(logits: jax.Array, sampling, vocab: int) -> jax.Array:
  """A drafter's ranking of dynamic-tree candidates, [..., V] -> [..., vocab]: raw
  log-probabilities under greedy (the processed ones are a point mass), else the
  processed distribution the target's samples will be drawn from."""
  if sampling.greedy:
    return jax.nn.log_softmax(logits[..., :vocab].astype(jnp.float32), axis=-1)
  return log_probs(logits, sampling, vocab)[..., :vocab]


def _draft_dynamic_tree(draft_model, draft_params, state: State, config: SpeculativeConfig):
  """Grows an EAGLE-2 dynamic tree with the draft model: one call to catch the draft
  cache up with the committed tokens, then one call per expanded level.

  The catch-up call feeds the window tokens[c : c + depth + 1] from the draft's valid
  length c (the previous round's root + 1; never more than depth + 1 tokens behind);
  window tokens past the committed ones land in slots the expansion overwrites or the
  tree mask hides.

  Returns (node_tokens [B, N], parents [B, N], depths [B, N], draft cache, calls).
  """
  spec, sampling = config.tree, config.sampling
  batch, vocab = state.tokens.shape[0], draft_model.config.vocab_size
  rows = jnp.arange(batch)
  root = state.lengths - 1                                                    # [B] slot
  valid = state.draft_cache.lengths
  window = valid[:, None] + jnp.arange(spec.depth + 1)[None]                 # [B, W]
  out = draft_model.apply({'params': draft_params},
                          state.tokens[rows[:, None], jnp.minimum(window, state.tokens.shape[1] - 1)],
                          window, cache=state.draft_cache)

  scores = lambda logits: draft_scores(logits, sampling, vocab)

  def expand(cache, level, tokens, ancestors, parent):
    del parent  # The draft model's state is its cache: nothing per node to carry.
    start = root + 1 + (level - 1) * spec.top_k
    out = draft_model.apply({'params': draft_params}, tokens,
                            jnp.broadcast_to((root + level)[:, None], tokens.shape),
                            trees.tree_mask(ancestors, root, cache.capacity),
                            cache.replace(lengths=start))
    return out.cache, scores(out.logits)

  cache, node_tokens, parents, depths = trees.grow_dynamic_tree(
      spec, state.tokens[rows, root], scores(out.logits[rows, root - valid]), expand, out.cache)
  return node_tokens, parents, depths, cache.replace(lengths=state.lengths), spec.depth


def _commit(state, candidates: jax.Array, count: jax.Array, eos_ids) -> State:
  tokens, lengths, done = base.commit(state.tokens, state.lengths, state.limits, state.done,
                                      candidates, count, eos_ids)
  return state.replace(tokens=tokens, lengths=lengths, done=done)


def finish_round(state, accepted_tokens, num_accepted, next_token, target_cache, eos_ids,
                 **updates):
  """The round driver's end, for every draft-and-verify method: commits each row's
  accepted tokens and the target's token, keeps [last, accepted] in the target cache,
  books the round, and sets the method's own `updates` fields.

  state: any flax struct with tokens, lengths, limits, done, target_calls, histogram.
  accepted_tokens: [B, M] the accepted chain or tree path in order (entries past
  num_accepted [B] are ignored); next_token: [B] the replacement or bonus token.
  """
  batch = accepted_tokens.shape[0]
  candidates = jnp.concatenate([accepted_tokens, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  candidates = candidates.at[jnp.arange(batch), num_accepted].set(next_token)
  committed = _commit(state, candidates, num_accepted + 1, eos_ids)
  return committed.replace(
      target_cache=target_cache.replace(lengths=state.lengths + num_accepted),
      target_calls=state.target_calls + 1,
      histogram=state.histogram.at[num_accepted].add((~state.done).astype(jnp.int32)),
      **updates)


@functools.partial(jax.jit, static_argnames=('model', 'draft_model', 'config'))
def generate(model, params, draft_model, draft_params, prompts: jax.Array,
             prompt_lengths: jax.Array, config: SpeculativeConfig, rng: jax.Array) -> base.Output:
  """Speculative decoding of right-padded prompts [B, P] with lengths [B] (>= 1, < S).

  model / draft_model: Flax modules called like models.Transformer, sharing a tokenizer.
  """
  batch, prompt_len = prompts.shape
  capacity, k = config.cache_capacity, config.num_draft
  vocab = model.config.vocab_size
  rows = jnp.arange(batch)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))

  cache_size = capacity + config.cache_slack
  target = model.apply({'params': params}, prompts, positions,
                       cache=KVCache.empty(model.config, batch, cache_size))
  draft = draft_model.apply({'params': draft_params}, prompts, positions,
                            cache=KVCache.empty(draft_model.config, batch, cache_size))
  rng, key = jax.random.split(rng)
  first = jax.random.categorical(
      key, log_probs(target.logits[rows, prompt_lengths - 1], config.sampling, vocab))
  tokens = base.token_buffer(prompts, prompt_lengths, capacity)
  state = State(tokens=tokens, lengths=prompt_lengths,
                limits=base.row_limits(prompt_lengths, config.max_new_tokens, capacity),
                target_cache=target.cache.replace(lengths=prompt_lengths),
                draft_cache=draft.cache.replace(lengths=prompt_lengths),
                done=jnp.zeros((batch,), bool), rng=rng, target_calls=jnp.ones((), jnp.int32),
                draft_calls=jnp.ones((), jnp.int32),
                histogram=jnp.zeros((config.max_accepted + 1,), jnp.int32))
  state = _commit(state, first.astype(jnp.int32)[:, None], jnp.ones((batch,), jnp.int32),
                  config.eos_ids)

  def tree_round(state: State) -> State:
    spec = config.tree
    rng, draft_key, verify_key = jax.random.split(state.rng, 3)
    root = state.lengths - 1
    dynamic = isinstance(spec, trees.DynamicTreeSpec)
    if dynamic:
      node_tokens, parents, depths, draft_cache, calls = _draft_dynamic_tree(
          draft_model, draft_params, state, config)
      ancestors = trees.ancestors_from_parents(parents, spec.depth)
      draft_logp = None  # children are the draft's distinct top-k tokens
    else:
      node_tokens, draft_logp, draft_cache, calls = _draft_tree(
          draft_model, draft_params, state, config, draft_key)
      parents, depths, ancestors = spec.parents, jnp.asarray(spec.depths)[None], spec.ancestors
    out = model.apply({'params': params}, node_tokens, root[:, None] + depths,
                      trees.tree_mask(ancestors, root, cache_size), state.target_cache)
    target_logp = log_probs(out.logits, config.sampling, vocab)             # [B, N, V]
    path, num_accepted, next_token = verify.tree_accept(
        verify_key, node_tokens, jnp.asarray(parents), target_logp, spec.depth,
        spec.max_children, draft_logp, config.sampling.greedy)
    source, target = trees.path_slots(root, path, num_accepted, cache_size)
    if not dynamic:  # The static tree's draft cache holds its nodes of depth < D.
      draft_cache = draft_cache.move_slots(source, target)
    return finish_round(state, node_tokens[rows[:, None], path[:, 1:]], num_accepted,
                        next_token, out.cache.move_slots(source, target), config.eos_ids,
                        draft_cache=draft_cache, rng=rng,
                        draft_calls=state.draft_calls + calls)

  def chain_round(state: State) -> State:
    rng, draft_key, verify_key = jax.random.split(state.rng, 3)
    d = _draft(draft_model, draft_params, state, config, draft_key)
    last = state.tokens[rows, state.lengths - 1]
    chain = jnp.concatenate([last[:, None], d.tokens], axis=1)              # [B, K + 1]
    positions = state.lengths[:, None] - 1 + jnp.arange(k + 1)[None]
    out = model.apply({'params': params}, chain, positions, cache=state.target_cache)
    target_logp = log_probs(out.logits, config.sampling, vocab)             # [B, K + 1, V]
    num_accepted, next_token = verify.chain_accept(verify_key, d.tokens, d.logp, target_logp,
                                                   d.num_drafted)
    return finish_round(state, d.tokens, num_accepted, next_token, out.cache, config.eos_ids,
                        draft_cache=d.cache, rng=rng, draft_calls=state.draft_calls + d.calls)

  round_ = chain_round if config.tree is None else tree_round
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  return base.Output(tokens=state.tokens, lengths=state.lengths,
                     prompt_lengths=prompt_lengths, target_calls=state.target_calls,
                     stats={'draft_calls': state.draft_calls, 'accepted_histogram': state.histogram})


def mean_accepted(histogram) -> float:
  """tau: tokens committed per row per target call in the decoding rounds (n + 1)."""
  h = np.asarray(histogram, np.float64)
  return float((h * (np.arange(len(h)) + 1)).sum() / max(h.sum(), 1))
