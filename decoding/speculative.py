"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023):
the draft-model proposer for the round driver (decoding/driver.py).

The draft proposes, each round, one of:
  a chain   up to K tokens autoregressively (an inner while_loop; with an adaptive
            threshold a row stops drafting after a token the draft itself is unsure
            of, and the loop ends when every row has stopped);
  a static tree (trees.TreeSpec), level by level, one draft call per level: the
            draft's top-k children under greedy; when sampling, draws without
            replacement (tree_rule 'rrsw', verified by recursive rejection sampling
            without replacement) or i.i.d. draws ('specinfer', SpecInfer's rule);
  an EAGLE-2 dynamic tree (trees.DynamicTreeSpec), grown and pruned by the draft's
            cumulative log-probabilities; children are the draft's distinct top-k
            (greedy, or 'specinfer'), or drawn without replacement ('rrsw').
The driver verifies it with the target in one call and commits.

Draft cache invariant at the start of a round (L = the buffer's token count): chain
and static tree: it holds tokens[:L - 2] at least; the draft's first call feeds the
last two tokens (positions L - 2 and L - 1), so it is complete whether the previous
round accepted everything or not (rewriting slot L - 2 with the same token and context
is harmless). Dynamic tree: it holds tokens[:draft_cache.lengths].
"""
import dataclasses
from typing import Optional, Union

import flax
import jax
import jax.numpy as jnp

from decoding import driver, trees, verify
from decoding.proposal import Proposal, Proposer
from decoding.sampling import log_probs, mask_padded_vocab, sample_without_replacement
from models import KVCache, masks


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  num_draft: int = 4                       # K: drafted tokens per round, at most (chains)
  # SpecDec++-style stopping: a row stops drafting after a token whose probability under
  # the draft's raw (temperature 1, unfiltered) distribution is below this. 0 = off.
  # That token is still verified: dropping a token because of its own probability
  # would draw it from q(x | confident) while the verifier divides by q(x), a biased
  # rule. Deciding only whether to draft the *next* token keeps every draft ~ q.
  adaptive_threshold: float = 0.0
  # A draft tree instead of a chain (num_draft is then ignored): trees.TreeSpec (static)
  # or trees.DynamicTreeSpec (EAGLE-2); the target verifies the whole tree in one call.
  tree: Optional[Union[trees.TreeSpec, trees.DynamicTreeSpec]] = None
  # The exact rule for chains (verify.CHAIN_RULES): 'block' verification (Sun et al.
  # 2025, the default: never fewer accepted tokens) or the 'token'-level rule.
  chain_rule: str = 'block'
  # How a tree's children are drawn under sampling, and so verified (verify.TREE_RULES):
  # 'rrsw' without replacement (recursive rejection sampling without replacement) or
  # 'specinfer' (static trees: i.i.d. draws; dynamic trees: the draft's top-k).
  tree_rule: str = 'rrsw'

  def __post_init__(self):
    verify.check_chain_rule(self.chain_rule)
    verify.check_tree_rule(self.tree_rule)
    if self.num_draft < 1:
      raise ValueError(f'num_draft must be >= 1, got {self.num_draft}.')
    if not 0 <= self.adaptive_threshold < 1:
      raise ValueError(f'adaptive_threshold must be in [0, 1), got {self.adaptive_threshold}.')
    if self.tree is not None and self.adaptive_threshold > 0:
      raise ValueError('adaptive_threshold applies to chains; a tree has a fixed shape.')
    if isinstance(self.tree, trees.SparseTree):
      raise ValueError('A draft model grows a full static tree ("3,2,1") or a dynamic one '
                       '("dynamic:TOP_K,DEPTH,BUDGET"); sparse "paths:" trees are for heads.')

  @property
  def max_accepted(self) -> int:
    return self.tree.depth if self.tree is not None else self.num_draft

  def proposer(self, model, drafter) -> 'DraftModelProposer':
    if drafter is None:
      raise ValueError('The speculative method needs a draft model (--draft_workdir).')
    return DraftModelProposer(self, drafter, model)


@flax.struct.dataclass
class _Draft:
  """The inner drafting loop's state."""
  step: jax.Array          # [] int32 tokens drafted so far
  logits: jax.Array        # [B, V] the draft's logits for the next token
  cache: KVCache
  tokens: jax.Array        # [B, K] int32
  logp: jax.Array          # [B, K + 1, V] processed draft distributions (row K unused)
  num_drafted: jax.Array   # [B] int32
  drafting: jax.Array      # [B] bool: row still drafting
  calls: jax.Array         # [] int32


def conform_vocab(logits: jax.Array, draft_vocab: int, target_vocab: int,
                  target_width: int) -> jax.Array:
  """The draft's logits [..., V_draft] on the target's (padded) vocabulary axis
  [..., target_width]: cut or padded, and every id that the draft's or the target's
  vocabulary does not hold (>= min(draft_vocab, target_vocab): padding rows, ids the
  tokenizer never produces) gets -inf, i.e. no mass. A draft and target of one
  tokenizer whose embeddings were padded to different sizes (Qwen2-0.5B drafting for
  Qwen2-72B) then draft, verify and commit on one axis, in either direction."""
  width = logits.shape[-1]
  logits = mask_padded_vocab(logits, min(draft_vocab, target_vocab))
  if width > target_width:
    return logits[..., :target_width]
  if width < target_width:
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, target_width - width)]
    return jnp.pad(logits, pad, constant_values=-jnp.inf)
  return logits


class DraftModelProposer(Proposer):
  """A smaller model of the target's tokenizer drafts; its KV cache is the state.
  Its logits are put on the target's vocabulary axis (conform_vocab), so the two may
  pad their embeddings to different sizes."""
  needs_key = True

  def __init__(self, config: SpeculativeConfig, draft_model, target_model=None):
    self.config, self.draft = config, draft_model
    self.max_depth = config.max_accepted
    self.cache_slots = config.tree.cache_slots if config.tree is not None else 0
    if isinstance(config.tree, trees.DynamicTreeSpec):
      self.ranked_nodes = config.tree.budget
    target = (target_model or draft_model).config
    self.vocab_size = target.vocab_size   # ids past it (or the draft's) get no mass
    self._width = getattr(target, 'padded_vocab_size', target.vocab_size)

  def _apply(self, params, tokens, positions, mask=None, cache=None, write_slots=None):
    out = self.draft.apply({'params': params.drafter}, tokens, positions, mask, cache,
                           write_slots=write_slots)
    return out.replace(logits=conform_vocab(out.logits, self.draft.config.vocab_size,
                                            self.vocab_size, self._width))

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    # The draft's own prefill fills its cache only (its first proposal re-reads the last
    # two tokens): chunked as the target's, logits at the last position only.
    out = driver.chunked_prefill(self.draft, params.drafter, prompts, prompt_lengths,
                                 KVCache.empty(self.draft.config, prompts.shape[0], cache_size),
                                 self.config.prefill_chunk)
    return out.cache.keep(prompt_lengths), jnp.ones((), jnp.int32)

  def propose(self, params, cache, state, key):
    tree = self.config.tree
    if isinstance(tree, trees.DynamicTreeSpec):
      return self._dynamic_tree(params, cache, state, key)
    if tree is not None:
      return self._static_tree(params, cache, state, key)
    return self._chain(params, cache, state, key)

  def observe(self, params, cache, state, verified, path, num_accepted):
    if isinstance(self.config.tree, trees.TreeSpec):
      # The static tree's draft cache holds its nodes of depth < D: move the path.
      root = state.lengths - 1
      return cache.move_slots(*trees.path_slots(root, path, num_accepted, cache.capacity))
    if self.config.tree is None:  # Valid through the accepted tokens drafted and fed.
      return cache.keep(state.lengths + num_accepted - 1)
    return cache

  def _last_two(self, params, cache, state):
    """The draft's call on the last two tokens (positions = slots L - 2, L - 1)."""
    rows = jnp.arange(state.tokens.shape[0])
    two = state.lengths[:, None] + jnp.array([-2, -1])                      # [B, 2]
    return self._apply(params, state.tokens[rows[:, None], two], two, cache=cache,
                       write_slots=two)

  def _chain(self, params, cache, state, key):
    """Up to K tokens per row, one draft call each (an inner while_loop)."""
    config, batch = self.config, state.tokens.shape[0]
    rows, k, vocab = jnp.arange(batch), config.num_draft, self.vocab_size
    out = self._last_two(params, cache, state)
    init = _Draft(step=jnp.zeros((), jnp.int32), logits=out.logits[:, -1], cache=out.cache,
                  tokens=jnp.zeros((batch, k), jnp.int32),
                  logp=jnp.zeros((batch, k + 1, out.logits.shape[-1]), jnp.float32),
                  num_drafted=jnp.zeros((batch,), jnp.int32), drafting=~state.done,
                  calls=jnp.ones((), jnp.int32))

    def body(d: _Draft) -> _Draft:
      logp = log_probs(d.logits, config.sampling, vocab)                     # [B, V]
      token = jax.random.categorical(jax.random.fold_in(key, d.step), logp).astype(jnp.int32)
      drafting = d.drafting
      if config.adaptive_threshold > 0:
        raw = jax.nn.log_softmax(d.logits[:, :vocab], axis=-1)
        drafting &= raw[rows, token] >= jnp.log(config.adaptive_threshold)
      d = d.replace(tokens=d.tokens.at[:, d.step].set(token),
                    logp=d.logp.at[:, d.step].set(logp),
                    num_drafted=d.num_drafted + d.drafting.astype(jnp.int32),
                    drafting=drafting, step=d.step + 1)

      def feed(d: _Draft) -> _Draft:  # The draft's logits after this token.
        position = (state.lengths + d.step - 1)[:, None]
        out = self._apply(params, token[:, None], position, cache=d.cache, write_slots=position)
        return d.replace(logits=out.logits[:, 0], cache=out.cache, calls=d.calls + 1)

      return jax.lax.cond((d.step < k) & jnp.any(d.drafting), feed, lambda d: d, d)

    d = jax.lax.while_loop(lambda d: (d.step < k) & jnp.any(d.drafting), body, init)
    root = state.tokens[rows, state.lengths - 1]
    return Proposal.chain(root, d.tokens, d.logp, d.num_drafted), d.cache, d.calls

  def _static_tree(self, params, cache, state, key):
    """Expands the static tree level by level: one draft call per level. The draft
    cache gets the nodes of depth < D at slots root + node."""
    spec, sampling = self.config.tree, self.config.sampling
    batch, vocab = state.tokens.shape[0], self.vocab_size
    rows, root = jnp.arange(batch), state.lengths - 1
    out = self._last_two(params, cache, state)
    cache, level_logits = out.cache, out.logits[:, -1:]                    # [B, 1, V]
    node_tokens = jnp.zeros((batch, spec.num_nodes), jnp.int32).at[:, 0].set(
        state.tokens[rows, root])
    logp = jnp.zeros((batch, spec.num_nodes, out.logits.shape[-1]), jnp.float32)
    starts = spec.level_starts
    rrsw = not sampling.greedy and self.config.tree_rule == 'rrsw'
    candidates = jnp.full((batch, spec.num_nodes, spec.max_children), -1, jnp.int32)
    for depth, width in enumerate(spec.branching):
      level = log_probs(level_logits, sampling, vocab)                       # [B, n_d, V]
      logp = logp.at[:, starts[depth]:starts[depth + 1]].set(level)
      if sampling.greedy:  # The draft's top-k distinct tokens.
        masked = mask_padded_vocab(level_logits, vocab)
        children = jax.lax.top_k(masked, width)[1]                          # [B, n_d, k]
      elif rrsw:  # Distinct draws from q, in draw order (verify: RRSw).
        children = sample_without_replacement(jax.random.fold_in(key, depth), level, width)
        candidates = candidates.at[:, starts[depth]:starts[depth + 1], :width].set(children)
      else:  # i.i.d. draws from q, as SpecInfer's multi-candidate rule requires.
        children = jax.random.categorical(jax.random.fold_in(key, depth), level[:, :, None],
                                          shape=level.shape[:2] + (width,))
      node_tokens = node_tokens.at[:, starts[depth + 1]:starts[depth + 2]].set(
          children.reshape(batch, -1).astype(jnp.int32))
      if depth + 1 < spec.depth:  # The new level's logits propose the next one.
        nodes = slice(starts[depth + 1], starts[depth + 2])
        out = self._apply(params, node_tokens[:, nodes],
                          root[:, None] + jnp.asarray(spec.depths[nodes])[None],
                          masks.tree_mask(spec.ancestors[nodes], root, cache.capacity), cache,
                          write_slots=root[:, None] + jnp.arange(nodes.start, nodes.stop)[None])
        cache, level_logits = out.cache, out.logits
    return (Proposal.static_tree(spec, node_tokens, logp, candidates if rrsw else None), cache,
            spec.depth)

  def _dynamic_tree(self, params, cache, state, key):
    """Grows an EAGLE-2 dynamic tree: one call to catch the draft cache up with the
    committed tokens, then one call per expanded level.

    The catch-up call feeds the window tokens[c : c + depth + 1] from the draft's valid
    length c (the previous round's root + 1; never more than depth + 1 tokens behind);
    window tokens past the committed ones land in slots the expansion overwrites or the
    tree mask hides.
    """
    spec, sampling = self.config.tree, self.config.sampling
    batch, vocab = state.tokens.shape[0], self.vocab_size
    rows, root = jnp.arange(batch), state.lengths - 1
    valid = cache.lengths
    window = valid[:, None] + jnp.arange(spec.depth + 1)[None]                 # [B, W]
    capacity = state.tokens.shape[1]
    out = self._apply(params, state.tokens[rows[:, None], jnp.minimum(window, capacity - 1)],
                      window, cache=cache)
    scores = lambda logits: draft_scores(logits, sampling, vocab)

    def expand(cache, level, tokens, ancestors, parent):
      del parent  # The draft model's state is its cache: nothing per node to carry.
      start = root + 1 + (level - 1) * spec.top_k
      out = self._apply(params, tokens, jnp.broadcast_to((root + level)[:, None], tokens.shape),
                        masks.tree_mask(ancestors, root, cache.capacity), cache,
                        write_slots=start[:, None] + jnp.arange(tokens.shape[1])[None])
      return out.cache, scores(out.logits)

    rrsw = not sampling.greedy and self.config.tree_rule == 'rrsw'
    cache, node_tokens, parents, depths, ranks, *drawn = trees.grow_dynamic_tree(
        spec, state.tokens[rows, root], scores(out.logits[rows, root - valid]), expand,
        out.cache, key if rrsw else None)
    if drawn:  # The draft's distributions on the target's (padded) vocabulary axis.
      drawn[0] = pad_vocab(drawn[0], self._width)
    return (Proposal.dynamic_tree(spec, node_tokens, parents, depths, *drawn, ranks=ranks),
            cache.keep(state.lengths), spec.depth)


def pad_vocab(logp: jax.Array, width: int) -> jax.Array:
  """Log-probabilities [..., vocab] (draft_scores) on an axis of `width` >= vocab ids:
  the ids past vocab get no mass (-inf)."""
  pad = [(0, 0)] * (logp.ndim - 1) + [(0, width - logp.shape[-1])]
  return jnp.pad(logp, pad, constant_values=-jnp.inf)


def draft_scores(logits: jax.Array, sampling, vocab: int) -> jax.Array:
  """A drafter's ranking of dynamic-tree candidates, [..., V] -> [..., vocab]: raw
  log-probabilities under greedy (the processed ones are a point mass), else the
  processed distribution the target's samples will be drawn from."""
  if sampling.greedy:
    return jax.nn.log_softmax(logits[..., :vocab].astype(jnp.float32), axis=-1)
  return log_probs(logits, sampling, vocab)[..., :vocab]
