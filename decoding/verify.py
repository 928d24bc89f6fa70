"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

Lossless rule (Leviathan et al. 2023; Chen et al. 2023). With q the draft's and p the
target's processed distributions (decoding/sampling.py, same filters for both):
accept drafted token x with probability min(1, p(x) / q(x)); at the first rejection
draw the replacement from norm(max(p - q, 0)); if every drafted token is accepted,
draw a bonus token from the target's next distribution. The committed tokens are then
distributed exactly as the target's own samples.

Greedy decoding is the same rule with point masses: p and q put all mass on their
argmax, so a drafted token is kept iff it equals the target's argmax, and the
replacement is the target's argmax. One rule serves both.

Shapes: B batch, K drafted tokens, V (padded) vocabulary; log-probabilities are float32.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TypicalAcceptance:
  """LOSSY: Medusa's typical acceptance (Cai et al. 2024, section 2.3.1); see tree_accept."""
  epsilon: float = 0.09   # Medusa's posterior threshold
  delta: float = 0.3      # Medusa's posterior alpha (its default: sqrt(epsilon))


def accept(rng: jax.Array, proposal, target_logp: jax.Array, greedy: bool,
           typical: Optional[TypicalAcceptance] = None):
  """The one entry point of verification: the rule for any proposal.

  proposal: decoding.proposal.Proposal (tokens [B, N], node 0 the root); target_logp:
  [B, N, V] the target's processed distribution after each node's path.
  A chain drawn from a draft distribution goes through `chain_accept` (token-level
  rejection sampling); a tree, or a chain of deterministic candidates (draft_logp
  None: the point-mass rule), through `tree_accept` (SpecInfer's multi-candidate rule,
  or typical acceptance if given); there the chain's num_drafted [B], if given, is
  honoured: nodes past it are never accepted.

  Returns (path [B, D + 1] accepted node indices, path[:, 0] = 0 and entries past the
  accepted depth 0; num_accepted [B] int32; next_token [B] int32).
  Raises ValueError for typical acceptance of a chain drawn from a distribution.
  """
  if proposal.is_chain and proposal.draft_logp is not None:
    if typical is not None:
      raise ValueError('Typical acceptance is a rule for deterministic candidates; this '
                       'chain was drawn from a draft distribution.')
    k = proposal.tokens.shape[1] - 1
    num_drafted = (jnp.full(proposal.tokens.shape[:1], k, jnp.int32)
                   if proposal.num_drafted is None else proposal.num_drafted)
    num_accepted, next_token = chain_accept(rng, proposal.tokens[:, 1:],
                                            proposal.draft_logp[:, :k], target_logp,
                                            num_drafted)
    index = jnp.arange(k + 1)[None]
    return jnp.where(index <= num_accepted[:, None], index, 0), num_accepted, next_token
  parents = jnp.asarray(proposal.parents)
  if proposal.num_drafted is not None:
    # A chain of deterministic candidates with fewer real tokens in some rows (a lookup
    # without a match, a window cut at the row's limit): nodes past num_drafted are
    # nobody's child, so the walk stops there (next token from p, or the residual).
    nodes = jnp.arange(proposal.tokens.shape[1])[None]
    parents = jnp.where(nodes <= proposal.num_drafted[:, None], parents[None], -2)
  return tree_accept(rng, proposal.tokens, parents, target_logp, proposal.depth,
                     proposal.max_children, proposal.draft_logp, greedy,
                     None if typical is None else (typical.epsilon, typical.delta))


def residual_log_probs(target_logp: jax.Array, draft_logp: jax.Array) -> jax.Array:
  """log norm(max(p - q, 0)) over [..., V]; falls back to p where p <= q everywhere
  (possible only through rounding, when a rejection had probability ~0)."""
  residual = jnp.maximum(jnp.exp(target_logp) - jnp.exp(draft_logp), 0.0)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  fallback = total <= 1e-12
  return jnp.where(fallback, target_logp, jnp.log(residual) - jnp.log(jnp.where(fallback, 1.0,
                                                                                total)))


def chain_accept(rng: jax.Array, draft_tokens: jax.Array, draft_logp: jax.Array,
                 target_logp: jax.Array, num_drafted: jax.Array):
  """Verifies one chain of drafted tokens per row.

  draft_tokens: [B, K] int32; draft_logp: [B, K, V] the draft's processed distribution
  each token was drawn from; target_logp: [B, K + 1, V] the target's processed
  distribution after the context and each drafted prefix; num_drafted: [B] int32 how
  many of the K drafted tokens are real (adaptive drafting stops early).

  Returns (num_accepted [B] int32 in [0, num_drafted], next_token [B] int32: the
  replacement at the first rejection, or the bonus token after full acceptance).
  """
  batch, k = draft_tokens.shape
  rows = jnp.arange(batch)
  accept_key, next_key = jax.random.split(rng)
  p_x = jnp.take_along_axis(target_logp[:, :k], draft_tokens[..., None], -1)[..., 0]   # [B, K]
  q_x = jnp.take_along_axis(draft_logp, draft_tokens[..., None], -1)[..., 0]
  u = jax.random.uniform(accept_key, (batch, k), minval=jnp.finfo(jnp.float32).tiny)
  accepted = (jnp.log(u) < p_x - q_x) & (jnp.arange(k)[None] < num_drafted[:, None])
  num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)

  p_next = target_logp[rows, num_accepted]                                        # [B, V]
  q_next = draft_logp[rows, jnp.minimum(num_accepted, k - 1)]
  rejected = num_accepted < num_drafted
  next_logp = jnp.where(rejected[:, None], residual_log_probs(p_next, q_next), p_next)
  next_token = jax.random.categorical(next_key, next_logp, axis=-1).astype(jnp.int32)
  return num_accepted, next_token


def tree_accept(rng: jax.Array, node_tokens: jax.Array, parents: jax.Array,
                target_logp: jax.Array, depth: int, max_children: int,
                draft_logp: Optional[jax.Array] = None, greedy: bool = False,
                typical: Optional[tuple[float, float]] = None):
  """Verifies one draft tree per row (decoding/trees.py), static or dynamic.

  node_tokens: [B, N] (node 0 = the last committed token); parents: [N] or [B, N]
  (-1 for the root), nodes in topological order; target_logp: [B, N, V] the target's
  processed distribution after each node's path; depth: the tree's maximum depth;
  max_children: the most children a node has.

  How the children of a node were drafted decides the rule (both are SpecInfer's
  multi-candidate rule, which tries the children in order):
    draft_logp [B, N, V] given: the children were drawn i.i.d. from q = draft_logp of
      their parent. Accept child x with probability min(1, p(x) / q(x)); after a
      rejection p becomes norm(max(p - q, 0)) for the next sibling.
    draft_logp None: the children are distinct tokens the drafter chose
      deterministically (top-k; Medusa, EAGLE-2), i.e. q is a point mass on each.
      Accept child x with probability p(x); after a rejection p becomes
      norm(max(p - 1_x, 0)): p without x, renormalised. (Equivalent to drawing one
      token from p and taking the child that carries it.)
  If every child is rejected, the next token is drawn from the last residual; at a
  leaf, the bonus token from p. Greedy (point-mass p): descend to the child equal to
  the target's argmax while there is one.

  typical=(epsilon, delta): LOSSY, Medusa's typical acceptance (Cai et al. 2024), not
  distributed as the target. Take the first child x whose target probability clears
  p(x) > min(epsilon, delta * exp(-H(p))), H the entropy of p at the parent; where no
  child does, or at a leaf, draw the next token from p. It accepts more than the exact
  rule when p is flat, at the price of favouring the drafter's guesses.

  Returns (path [B, depth + 1] node indices with path[:, 0] = 0 and entries past the
  accepted depth 0, num_accepted [B] int32, next_token [B] int32).
  """
  batch, num_nodes = node_tokens.shape
  rows = jnp.arange(batch)
  parents = jnp.broadcast_to(parents, (batch, num_nodes))
  keys = iter(jax.random.split(rng, depth * (max_children + 1) + 1))
  current = jnp.zeros((batch,), jnp.int32)
  alive = jnp.ones((batch,), bool)           # still descending
  next_token = jnp.zeros((batch,), jnp.int32)
  path = [current]
  for _ in range(depth):
    is_child = (parents == current[:, None]) & (jnp.arange(num_nodes) > 0)  # [B, N]
    q_parent = None if draft_logp is None else draft_logp[rows, current]
    found, chosen, p = _try_children(keys, node_tokens, is_child, target_logp[rows, current],
                                     q_parent, alive, current, max_children, greedy, typical)
    stop = alive & ~found
    drawn = jax.random.categorical(next(keys), p).astype(jnp.int32)
    next_token = jnp.where(stop, drawn, next_token)
    alive = alive & found
    current = jnp.where(found, chosen, current)
    path.append(jnp.where(found, chosen, 0))
  bonus = jax.random.categorical(next(keys), target_logp[rows, current]).astype(jnp.int32)
  next_token = jnp.where(alive, bonus, next_token)
  num_accepted = jnp.sum(jnp.stack(path[1:], axis=1) > 0, axis=1).astype(jnp.int32)
  return jnp.stack(path, axis=1), num_accepted, next_token



def _try_children(keys, node_tokens, is_child, p, q_parent, alive, current, max_children,
                  greedy, typical):
  """One level of tree_accept: tries the children of `current` [B] (is_child [B, N]) in
  sibling order against p [B, V]; q_parent [B, V] the draft distribution they were drawn
  from, or None (point masses). Uses one key of `keys` per child when sampling exactly.
  Returns (found [B], chosen [B] node, p [B, V] after the rejected children)."""
  batch = p.shape[0]
  rows = jnp.arange(batch)
  if typical is not None:
    entropy = -jnp.sum(jnp.where(p > -jnp.inf, jnp.exp(p) * p, 0.0), axis=-1)
    threshold = jnp.minimum(typical[0], typical[1] * jnp.exp(-entropy))     # [B]
  rank = jnp.cumsum(is_child, axis=1) - 1
  found, chosen = jnp.zeros((batch,), bool), current
  for j in range(max_children):
    slot = is_child & (rank == j)
    exists, child = jnp.any(slot, axis=1), jnp.argmax(slot, axis=1).astype(jnp.int32)
    x = node_tokens[rows, child]
    p_x = p[rows, x]
    if greedy:
      ok = p_x == 0.0  # log p(x) = 0: x is the target's argmax
    elif typical is not None:
      ok = jnp.exp(p_x) > threshold
    else:
      q = (jnp.where(jnp.arange(p.shape[-1]) == x[:, None], 0.0, -jnp.inf)
           if q_parent is None else q_parent)
      u = jax.random.uniform(next(keys), (batch,), minval=jnp.finfo(jnp.float32).tiny)
      ok = jnp.log(u) < p_x - q[rows, x]
    take = ok & exists & ~found & alive
    chosen = jnp.where(take, child, chosen)
    found = found | take
    if not greedy and typical is None:  # Rows that rejected this child: the residual.
      rejected = exists & ~found & alive
      p = jnp.where(rejected[:, None], residual_log_probs(p, q), p)
  return found, chosen, p
