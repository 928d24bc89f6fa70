"""The proposer interface: what any drafter hands the verifier, and how it keeps state.

A proposer is anything that drafts: a draft model (chain, static tree, dynamic tree),
Medusa / MTP heads, EAGLE, and later prompt lookup, a Jacobi window, the model's own
first layers, a parallel block drafter. decoding/driver.py runs every one of them
through the same round:

    state = proposer.start(params, prefill, prompts, prompt_lengths, cache_size)
    each round:
      proposal, state, calls = proposer.propose(params, state, loop_state, key)
      ... the target scores the proposal, verify.accept walks it ...
      state = proposer.observe(params, state, loop_state, verified, path, num_accepted)

Axis letters: B batch, N proposal nodes (node 0 = the root, the last committed
token), D the proposal's depth, V padded vocabulary.

To add a method: subclass Proposer in one file, give it a config (a
driver.DecodeConfig subclass whose `proposer` builds it), and add one entry to
decoding/registry.py (or call registry.register from your own module and pass
--plugins=your.module to launch.decode / launch.bench).
"""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoding import trees


@flax.struct.dataclass
class Proposal:
  """One round's draft, in tree form (a chain is the tree whose parents are i - 1).

  tokens: [B, N] int32 node tokens; node 0 is the root (the last committed token).
  depths: [N] or [B, N] int, each node's depth (root 0); the target reads node i at
    position root + depth(i) and writes it to cache slot root + i.
  parents: [N] or [B, N] int, -1 for the root; nodes in topological order.
  ancestors: [N, N] or [B, N, N] bool (i attends to j iff j is i or its ancestor), or
    None for a chain (then the target call is causal and needs no tree mask).
  draft_logp: [B, N, V] float32, row i the processed distribution node i's children
    were drawn from (i.i.d. draws; the token-level / SpecInfer rule uses it), or None
    for deterministic candidates (top-k, a lookup: the point-mass rule).
  num_drafted: [B] int32, chains only: how many of the N - 1 drafted tokens are real
    (adaptive drafting stops early); None = all.
  candidates: [B, N, C] int32 or None, trees only: row i the tokens drawn in order
    WITHOUT replacement (Gumbel-top-k) from draft_logp[:, i] as node i's children
    candidates, -1 = none; node i's children are some of them (a dynamic tree's
    reranking or a sparse tree may leave some out). Given, the verifier uses recursive
    rejection sampling without replacement (verify.tree_accept); None = the children
    were drawn i.i.d. (draft_logp given) or chosen deterministically (draft_logp None).
  ranks: [B, N] int32 or None, dynamic trees only: each node's rank in EAGLE-2's
    reranking (root -1; the budget-b tree is the nodes of rank < b), which the round
    driver counts over accepted nodes (driver.State.rank_histogram).
  depth, max_children: static ints, the tree's maximum depth and widest node.
  """
  tokens: jax.Array
  depths: Any
  parents: Any
  ancestors: Any = None
  draft_logp: Optional[jax.Array] = None
  num_drafted: Optional[jax.Array] = None
  candidates: Optional[jax.Array] = None
  ranks: Optional[jax.Array] = None
  depth: int = flax.struct.field(pytree_node=False, default=1)
  max_children: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def is_chain(self) -> bool:
    return self.ancestors is None

  @classmethod
  def chain(cls, root: jax.Array, drafted: jax.Array, draft_logp=None,
            num_drafted=None) -> 'Proposal':
    """root: [B] the last committed token; drafted: [B, K] the drafted tokens in order;
    draft_logp: [B, K + 1, V] or None; num_drafted: [B] or None."""
    k = drafted.shape[1]
    return cls(tokens=jnp.concatenate([root[:, None], drafted], axis=1).astype(jnp.int32),
               depths=jnp.arange(k + 1)[None], parents=np.arange(-1, k), ancestors=None,
               draft_logp=draft_logp, num_drafted=num_drafted, depth=k, max_children=1)


  @classmethod
  def static_tree(cls, spec, tokens: jax.Array, draft_logp=None,
                  candidates=None) -> 'Proposal':
    """A static tree (trees.TreeSpec or trees.SparseTree) with node tokens [B, N];
    draft_logp [B, N, V] and candidates [B, N, C] or None (see the class)."""
    return cls(tokens=tokens.astype(jnp.int32), depths=jnp.asarray(spec.depths)[None],
               parents=spec.parents, ancestors=spec.ancestors, draft_logp=draft_logp,
               candidates=candidates, depth=spec.depth, max_children=spec.max_children)

  @classmethod
  def dynamic_tree(cls, spec, tokens: jax.Array, parents: jax.Array, depths: jax.Array,
                   draft_logp=None, candidates=None, ranks=None) -> 'Proposal':
    """A per-row tree (trees.grow_dynamic_tree): tokens, parents, depths [B, N]; its
    children are the drafter's distinct top-k tokens (deterministic candidates), or,
    with draft_logp [B, N, V] and candidates [B, N, top_k], draws without replacement;
    ranks [B, N]: the nodes' reranking order (see the class)."""
    return cls(tokens=tokens, depths=depths, parents=parents,
               ancestors=trees.ancestors_from_parents(parents, spec.depth),
               draft_logp=draft_logp, candidates=candidates, ranks=ranks, depth=spec.depth,
               max_children=spec.max_children)


class Proposer:
  """The drafter side of the speculative round. Built while tracing by a method's
  config from static modules; its state across rounds is a pytree it returns.

  Attributes:
    max_depth: the most drafted tokens one round can accept (the histogram's size - 1).
    cache_slots: target cache slots a round needs past the buffer (tree node i sits in
      slot root + i, past its position root + depth(i)); 0 for chains.
    needs_key: whether `propose` draws random numbers (then the round splits its key
      three ways: next round, proposal, verification; else two).
    needs_layer_hidden: whether the target's prefill and verification calls return its
      per-block hidden states (ForwardOutput.layer_hidden) for `start` and `observe`
      (EAGLE-3 reads several target layers).
    ranked_nodes: a dynamic tree's budget when its proposals carry node ranks
      (Proposal.ranks): the driver then counts accepted nodes by rank; 0 = none.
  """
  max_depth: int = 1
  cache_slots: int = 0
  needs_key: bool = False
  needs_layer_hidden: bool = False
  ranked_nodes: int = 0

  def start(self, params, prefill, prompts: jax.Array, prompt_lengths: jax.Array,
            cache_size: int) -> tuple[Any, jax.Array]:
    """After the target's prefill (a ForwardOutput over the padded prompts [B, P]: hidden
    [B, P, D], logits [B, 1, V] at each row's last prompt position only):
    -> (the proposer's state, drafter calls made [] int32). params: driver.Params."""
    del params, prefill, prompts, prompt_lengths, cache_size
    return None, jnp.zeros((), jnp.int32)

  def propose(self, params, state, loop_state, key) -> tuple[Proposal, Any, jax.Array]:
    """-> (this round's Proposal, the proposer's state, drafter calls made [] int32).
    loop_state: driver.State (tokens, lengths: the root is tokens[b, lengths[b] - 1])."""
    raise NotImplementedError

  def score(self, model, params, proposal: Proposal, positions: jax.Array, cache,
            state) -> Optional[Any]:
    """The round's one target call, when the proposer makes it itself; None (the
    default) = the driver's call: the whole target on the proposal's nodes.

    A self-drafting proposer (decoding/self_speculative.py) drafts into the target's own
    cache and has already run the target's first layers on the nodes; it returns the
    target's ForwardOutput on the nodes (logits [B, N, V], the cache with this call's
    tokens appended, as the driver's call would return them). model, params: the
    target and driver.Params; positions: [B, N] the nodes' positions; cache: the loop's
    target cache; state: what `propose` returned this round.
    """
    del model, params, proposal, positions, cache, state
    return None

  def observe(self, params, state, loop_state, verified, path: jax.Array,
              num_accepted: jax.Array) -> Any:
    """After verification: the target's ForwardOutput on the proposal (`verified`:
    logits, hidden, cache), the accepted path [B, D + 1] node indices (path[:, 0] = 0,
    entries past num_accepted [B] are 0). -> the proposer's state for the next round."""
    del params, loop_state, verified, path, num_accepted
    return state
