"""Parallel block drafting (DFlash; Chen, Liang and Liu 2026, arXiv 2602.06036) with
best-first draft trees (DDTree; Ringel et al. 2026, arXiv 2604.12989): the proposer for
the round driver (decoding/driver.py).

The drafter (models.ParallelDrafter) reads the target's hidden states from several
layers; each round costs ONE drafter call whatever the block size:

  1. the call: the context entries the drafter has not seen yet (the target's fused
     features of the tokens committed last round: the previous root and the accepted
     drafts, at most depth + 1 of them) are written into the drafter's KV cache, and the
     block [x_r, MASK, ..., MASK] at positions r .. r + b - 1 (r = the root) attends to
     the whole context and, bidirectionally, to itself; block output k is the drafter's
     distribution q_k for x_{r+k}, k = 1 .. K (K = block_size - 1 used positions of the
     trained block: the drafter always runs the block it was trained on and the round
     keeps the first K);
  2a. a chain (DFlash): x_{r+k} = argmax q_k under greedy, else a draw from q_k
     processed as the target's samples are (decoding/sampling.log_probs: temperature,
     top-k, top-p, min-p), independently per position; the proposal's draft_logp holds
     exactly those processed q_k, so block verification (or the token-level rule)
     accepts against the distribution each token was drawn from (a drafter drawing at
     temperature 1 while the verifier divides by q at another temperature would not be
     lossless: tests/test_parallel_drafter.py fails that rule). The positions being
     independent given the context is allowed: the rules ask only that x_{r+k} be drawn
     from the q_k the verifier is given, which may ignore x_{r+1} .. x_{r+k-1};
  2b. a best-first tree (DDTree): the `budget` most probable prefixes under the product
     of the q_k (decoding/trees.best_first_tree) from the same one call, the children of
     a node its depth's top_k tokens; they are deterministic candidates, verified with
     the point-mass rule (verify.tree_accept with draft_logp None), lossless under greedy
     and sampling. Under sampling the tree ranks the processed q_k (the distribution the
     target's samples come from), under greedy the raw ones (speculative.draft_scores);
  3. the target scores the proposal in one call (driver), returning its per-layer hidden
     states (Proposer.needs_layer_hidden); `observe` keeps those of the accepted path (root
     first) as the next call's new context entries.

Drafter cache invariant at the start of a round (r = the root): it holds the context
entries of positions < cache.lengths = the previous round's root r', and `features`
holds the target's features of positions r' .. r - 1 (entries past r - 1 are junk and
are written to no slot). The block's own keys/values go to slots r .. r + b - 1 and are
not kept.
"""
import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from decoding import driver, trees
from decoding.proposal import Proposal, Proposer
from decoding.sampling import log_probs, mask_padded_vocab
from decoding.speculative import draft_scores
from models import KVCache, ParallelDrafter, masks


def check_drafter(model, drafter) -> None:
  """Refuses a drafter that cannot read this target: it must be a ParallelDrafter trained
  on a target of the same shapes (width, layers it reads, vocabulary). Raises ValueError
  naming every mismatch."""
  if not isinstance(drafter, ParallelDrafter):
    raise ValueError('The parallel_draft method needs a parallel drafter workdir '
                     '(--draft_workdir), trained with configs/parallel_drafter.py; got '
                     f'{type(drafter).__name__}.')
  mine, theirs = model.config, drafter.config
  fields = ('vocab_size', 'padded_vocab_size', 'd_model', 'num_layers', 'num_heads',
            'num_kv_heads', 'head_dim', 'mlp_dim', 'tie_embeddings')
  diffs = [f'{name} {getattr(theirs, name)} (this target: {getattr(mine, name)})'
           for name in fields if getattr(theirs, name) != getattr(mine, name)]
  if diffs:
    raise ValueError('The parallel drafter was trained on another target: '
                     + ', '.join(diffs) + '. Train one for this target with '
                     'configs/parallel_drafter.py --config.target_workdir=...')


@dataclasses.dataclass(frozen=True)
class ParallelDraftConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  # Tokens per verified block: the root + block_size - 1 drafted positions; 0 = the
  # drafter's trained block. At most the trained block (a longer one was never trained).
  block_size: int = 0
  # None = a chain (DFlash); a trees.BestFirstTreeSpec = DDTree's tree from the same call.
  tree: Optional[trees.BestFirstTreeSpec] = None

  def __post_init__(self):
    if self.block_size < 0 or self.block_size == 1:
      raise ValueError(f'block_size={self.block_size}: give 0 (the drafter\'s trained block) '
                       'or >= 2 (the root and at least one drafted token).')
    if self.tree is not None and not isinstance(self.tree, trees.BestFirstTreeSpec):
      raise ValueError('The parallel drafter grows best-first trees from one call ("best:'
                       f'BUDGET[,TOP_K]", like "best:16,4"), not {self.tree}.')

  def drafted(self, drafter: ParallelDrafter) -> int:
    """K, the drafted positions a round uses. Raises ValueError when the block size or
    the tree budget is out of range for `drafter`."""
    if self.block_size > drafter.block_size:
      raise ValueError(f'block_size={self.block_size} is out of range: the drafter was '
                       f'trained on blocks of {drafter.block_size} tokens; give 2 .. '
                       f'{drafter.block_size} (or 0 for {drafter.block_size}).')
    k = (self.block_size or drafter.block_size) - 1
    if self.tree is not None:
      self.tree.check_depth(k)
    return k

  def proposer(self, model, drafter) -> 'ParallelDraftProposer':
    if drafter is None:
      raise ValueError('The parallel_draft method needs a parallel drafter (--draft_workdir).')
    check_drafter(model, drafter)
    return ParallelDraftProposer(self, model, drafter)


@flax.struct.dataclass
class ParallelDraftState:
  cache: KVCache        # the drafter's layers; context entries in slots < cache.lengths
  features: jax.Array   # [B, K + 1, F] target features of positions cache.lengths + j


class ParallelDraftProposer(Proposer):
  """models.ParallelDrafter with the target's embedding and LM head (params.target)."""
  needs_layer_hidden = True

  def __init__(self, config: ParallelDraftConfig, model, drafter: ParallelDrafter):
    self.config, self.model, self.drafter = config, model, drafter
    self.depth = config.drafted(drafter)
    self.max_depth = self.depth
    tree_slots = 0 if config.tree is None else config.tree.cache_slots
    # The block's entries sit in slots root .. root + b - 1 of the drafter's cache.
    self.cache_slots = max(tree_slots, drafter.block_size)
    self.needs_key = not config.sampling.greedy and config.tree is None
    vocab = model.config
    self.vocab_size = vocab.vocab_size
    self._width = getattr(vocab, 'padded_vocab_size', vocab.vocab_size)

  def _features(self, layer_hidden, index=None) -> jax.Array:
    """The target's chosen layers' hidden states [B, T, D] each -> [B, T, F]."""
    chosen = [layer_hidden[i] for i in self.drafter.target_layers]
    if index is not None:
      rows = jnp.arange(index.shape[0])[:, None]
      chosen = [h[rows, index] for h in chosen]
    return jnp.concatenate(chosen, axis=-1)

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    """The drafter's cache gets the prompt's context entries (positions < prompt length:
    the root, the first token, has no target features yet)."""
    batch, prompt_len = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    slots = jnp.where(positions < prompt_lengths[:, None], positions, cache_size)
    cache = KVCache.empty(self.drafter.layer_config, batch, cache_size)
    mask = masks.slot_causal_mask(positions, cache_size)
    _, cache = self.drafter.apply({'params': params.drafter}, self._features(prefill.layer_hidden),
                                  None, None, positions, mask, cache, write_slots=slots)
    features = jnp.zeros((batch, self.depth + 1, self.drafter.feature_size),
                         prefill.layer_hidden[0].dtype)
    return (ParallelDraftState(cache=cache.keep(prompt_lengths), features=features),
            jnp.ones((), jnp.int32))

  def _draft(self, params, pstate: ParallelDraftState, state):
    """The round's one drafter call -> (logits [B, K, V] for positions root + 1 .. root + K,
    the drafter's cache)."""
    batch, b = state.tokens.shape[0], self.drafter.block_size
    rows, root = jnp.arange(batch), state.lengths - 1
    capacity = pstate.cache.capacity
    width = pstate.features.shape[1]
    context = pstate.cache.lengths[:, None] + jnp.arange(width)[None]          # [B, W]
    context_slots = jnp.where(context < root[:, None], context, capacity)       # junk: dropped
    block = root[:, None] + jnp.arange(b)[None]                                 # [B, b]
    roots = jnp.broadcast_to(state.tokens[rows, root][:, None], (batch, b))
    embedded = self.model.apply({'params': params.target}, roots, method=self.model.embed)
    is_mask = jnp.broadcast_to(jnp.arange(b) >= 1, (batch, b))
    mask = masks.block_slot_mask(root, b, capacity)                             # [B, b, S]
    mask = jnp.concatenate([jnp.broadcast_to(mask[:, :1], (batch, width, capacity)), mask], 1)
    hidden, cache = self.drafter.apply(
        {'params': params.drafter}, pstate.features, embedded, is_mask,
        jnp.concatenate([context, block], axis=1), mask, pstate.cache,
        write_slots=jnp.concatenate([context_slots, block], axis=1))
    logits = self.model.apply({'params': params.target}, hidden[:, 1:self.depth + 1],
                              method=self.model.logits)
    return logits, cache.keep(root)

  def propose(self, params, pstate: ParallelDraftState, state, key):
    sampling = self.config.sampling
    rows, root = jnp.arange(state.tokens.shape[0]), state.lengths - 1
    logits, cache = self._draft(params, pstate, state)
    root_token = state.tokens[rows, root]
    calls = jnp.ones((), jnp.int32)
    if self.config.tree is not None:
      scores = draft_scores(logits, sampling, self.vocab_size)                  # [B, K, vocab]
      tokens, parents, depths = trees.best_first_tree(self.config.tree, root_token, scores)
      proposal = Proposal(tokens=tokens, depths=depths, parents=parents,
                          ancestors=trees.ancestors_from_parents(parents, self.depth),
                          depth=self.depth, max_children=self.config.tree.max_children)
      return proposal, pstate.replace(cache=cache), calls
    logp = log_probs(logits, sampling, self.vocab_size)                          # [B, K, V]
    if sampling.greedy:
      drafted = jnp.argmax(mask_padded_vocab(logits, self.vocab_size), axis=-1)
    else:
      drafted = jax.random.categorical(key, logp, axis=-1)
    logp = jnp.concatenate([logp, jnp.zeros_like(logp[:, :1])], axis=1)           # row K unused
    return (Proposal.chain(root_token, drafted.astype(jnp.int32), logp),
            pstate.replace(cache=cache), calls)

  def observe(self, params, pstate: ParallelDraftState, state, verified, path, num_accepted):
    """The target's features on the accepted path, root first: the next call's new
    context entries (positions root, root + 1, ...)."""
    del params, state, num_accepted
    return pstate.replace(features=self._features(verified.layer_hidden, path).astype(
        pstate.features.dtype))


def make_config(settings: dict, block_size: int, tree: str, model, drafter) -> ParallelDraftConfig:
  """The method's config from the shared settings (registry.base_settings), the
  --block_size and --tree options, checked against the target `model` and `drafter`
  (None: checked when decoding). Raises ValueError (one line) for a drafter of another
  target, or a block size / tree budget out of range."""
  parsed = trees.parse(tree) if tree else None
  config = ParallelDraftConfig(**settings, block_size=block_size, tree=parsed)
  if drafter is not None:
    check_drafter(model, drafter)
    config.drafted(drafter)
  return config

