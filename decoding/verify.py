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

Block verification (Sun et al., ICLR 2025; `block_accept`) accepts a drafted chain
jointly instead of token by token: same output distribution, never fewer accepted
tokens in expectation; it is the default rule for chains drawn from a draft
(chain_rule='block'; 'token' selects the token-level rule above).

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


CHAIN_RULES = ('block', 'token')
# How tree proposers draw a node's children under sampling, and so the rule that
# verifies them: 'rrsw' = without replacement (Gumbel-top-k), recursive rejection
# sampling without replacement; 'specinfer' = i.i.d. draws (a draft model's static
# tree) or the deterministic top-k (heads, dynamic trees), SpecInfer's rule.
TREE_RULES = ('rrsw', 'specinfer')


def check_tree_rule(tree_rule: str) -> None:
  """Raises ValueError unless tree_rule is one of TREE_RULES."""
  if tree_rule not in TREE_RULES:
    raise ValueError(f'tree_rule must be one of {", ".join(TREE_RULES)}; '
                     f'got {tree_rule!r}.')


def check_chain_rule(chain_rule: str) -> None:
  """Raises ValueError unless chain_rule is one of CHAIN_RULES."""
  if chain_rule not in CHAIN_RULES:
    raise ValueError(f'chain_rule must be one of {", ".join(CHAIN_RULES)}; '
                     f'got {chain_rule!r}.')


def accept(rng: jax.Array, proposal, target_logp: jax.Array, greedy: bool,
           typical: Optional[TypicalAcceptance] = None, chain_rule: str = 'block'):
  """The one entry point of verification: the rule for any proposal.

  proposal: decoding.proposal.Proposal (tokens [B, N], node 0 the root); target_logp:
  [B, N, V] the target's processed distribution after each node's path.
  A chain drawn from a draft distribution goes through `block_accept` (block
  verification, chain_rule='block', the default) or `chain_accept` (token-level
  rejection sampling, chain_rule='token'); a tree, or a chain of deterministic
  candidates (draft_logp None: the point-mass rule; block verification gains nothing
  there), through `tree_accept` (SpecInfer's multi-candidate rule,
  or typical acceptance if given); there the chain's num_drafted [B], if given, is
  honoured: nodes past it are never accepted.

  Returns (path [B, D + 1] accepted node indices, path[:, 0] = 0 and entries past the
  accepted depth 0; num_accepted [B] int32; next_token [B] int32).
  Raises ValueError for typical acceptance of a chain drawn from a distribution, or an
  unknown chain_rule.
  """
  check_chain_rule(chain_rule)
  if proposal.is_chain and proposal.draft_logp is not None and typical is not None:
    raise ValueError('Typical acceptance is a rule for deterministic candidates; this '
                     'chain was drawn from a draft distribution.')
  if greedy:  # p is a point mass: every rule reduces to following the target's argmax.
    return greedy_accept(proposal, jnp.argmax(target_logp, axis=-1).astype(jnp.int32))
  if proposal.is_chain and proposal.draft_logp is not None:
    k = proposal.tokens.shape[1] - 1
    num_drafted = (jnp.full(proposal.tokens.shape[:1], k, jnp.int32)
                   if proposal.num_drafted is None else proposal.num_drafted)
    rule = block_accept if chain_rule == 'block' else chain_accept
    num_accepted, next_token = rule(rng, proposal.tokens[:, 1:], proposal.draft_logp[:, :k],
                                    target_logp, num_drafted)
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
                     proposal.max_children, proposal.draft_logp,
                     None if typical is None else (typical.epsilon, typical.delta),
                     proposal.candidates)


def greedy_accept(proposal, target_ids: jax.Array):
  """Greedy verification of any proposal (chain or tree, drawn or deterministic).

  Under greedy decoding the target's processed distribution at every node is a point
  mass on its argmax, so each rule of this module (the token-level and block rules for
  chains, SpecInfer's and RRSw's for trees) keeps exactly the path that follows the
  target's argmax from the root, and the next token is the argmax after its last node
  (the replacement after a mismatch, or the bonus token). This computes that directly
  on the node ids: no random numbers and no pass over the vocabulary per level, which
  on a CPU cost a round several ms at SmolLM2's 49k vocabulary (the draws of
  `tree_accept`'s levels and bonus). Identical results to `accept` with point masses.

  proposal: decoding.proposal.Proposal (tokens [B, N], parents [N] or [B, N], depth;
  num_drafted [B] honoured: nodes past it are never accepted); target_ids: [B, N] int32,
  the target's argmax after each node's path (logits with the padded vocabulary masked).
  Returns (path [B, depth + 1] accepted node indices, path[:, 0] = 0, entries past the
  accepted depth 0; num_accepted [B] int32; next_token [B] int32).
  """
  tokens = proposal.tokens
  batch, num_nodes = tokens.shape
  rows, nodes = jnp.arange(batch), jnp.arange(num_nodes)[None]
  parents = jnp.broadcast_to(jnp.asarray(proposal.parents), (batch, num_nodes))
  if proposal.num_drafted is not None:
    parents = jnp.where(nodes <= proposal.num_drafted[:, None], parents, -2)
  current = jnp.zeros((batch,), jnp.int32)
  alive = jnp.ones((batch,), bool)
  path = [current]
  for _ in range(proposal.depth):
    want = target_ids[rows, current]
    match = (parents == current[:, None]) & (nodes > 0) & (tokens == want[:, None])
    found = alive & jnp.any(match, axis=1)
    current = jnp.where(found, jnp.argmax(match, axis=1).astype(jnp.int32), current)
    alive = found
    path.append(jnp.where(found, current, 0))
  path = jnp.stack(path, axis=1)
  num_accepted = jnp.sum(path[:, 1:] > 0, axis=1).astype(jnp.int32)
  return path, num_accepted, target_ids[rows, current]


def residual_log_probs(target_logp: jax.Array, draft_logp: jax.Array,
                       log_weight: Optional[jax.Array] = None) -> jax.Array:
  """log norm(max(w p - q, 0)) over [..., V], w = exp(log_weight [...]) (1 if None; block
  verification's residual weight); falls back to p where w p <= q everywhere (possible
  only through rounding, when a rejection had probability ~0)."""
  weighted = target_logp if log_weight is None else log_weight[..., None] + target_logp
  residual = jnp.maximum(jnp.exp(weighted) - jnp.exp(draft_logp), 0.0)
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


def block_accept(rng: jax.Array, draft_tokens: jax.Array, draft_logp: jax.Array,
                 target_logp: jax.Array, num_drafted: jax.Array):
  """Block verification of one chain of drafted tokens per row (Sun et al., "Block
  Verification Accelerates Speculative Decoding", ICLR 2025, Algorithm 2): the block is
  accepted jointly, not token by token. Same arguments, shapes and results as
  `chain_accept`; the committed tokens are distributed as the target's own samples, and
  the expected number accepted is never below the token-level rule's (the paper's
  Theorem 2: it is optimal among valid verifications of one drafted block).

  With X_1 .. X_g the g = num_drafted drafted tokens, p_i / q_i the target's / draft's
  distributions after X_1 .. X_i:
    residual weights  w_0 = 1,  w_i = min(w_{i-1} p_{i-1}(X_i) / q_{i-1}(X_i), 1);
    residual masses   r_i = sum_x max(w_i p_i(x) - q_i(x), 0);
    stop chances      h_i = r_i / (r_i + 1 - w_i) for i < g, h_g = w_g;
    the accepted length is the largest i with eta_i <= h_i (eta_i ~ U(0, 1) i.i.d.;
    the paper's backward scan), 0 if none;
    the next token: at i = g a bonus token from p_g, else a draw from the residual
    norm(max(w_i p_i - q_i, 0)).
  With one drafted token this is the token-level rule. Where r_i + 1 - w_i = 0 (w_i = 1
  and p_i <= q_i everywhere, i.e. p_i = q_i: the draft cannot be rejected after X_i),
  h_i is taken as 1, the limit of r / (r + 1 - w) for r > 0; only rounding could
  make the choice visible, since then every later drafted token is accepted anyway.
  Under greedy (point masses) it keeps the longest prefix equal to the target's argmaxes,
  like the token-level rule.

  Cost: the residual masses read all K drafted positions' distributions ([B, K, V]
  elementwise), against one position for the token-level rule; no extra target call.
  """
  batch, k = draft_tokens.shape
  rows = jnp.arange(batch)
  accept_key, next_key = jax.random.split(rng)
  p_x = jnp.take_along_axis(target_logp[:, :k], draft_tokens[..., None], -1)[..., 0]   # [B, K]
  q_x = jnp.take_along_axis(draft_logp, draft_tokens[..., None], -1)[..., 0]
  log_w = [jnp.zeros((batch,), jnp.float32)]
  for i in range(k):  # K is small and static: the recurrence unrolled.
    log_w.append(jnp.minimum(log_w[-1] + p_x[:, i] - q_x[:, i], 0.0))
  log_w = jnp.stack(log_w, axis=1)                                                # [B, K + 1]
  weight = jnp.exp(log_w)
  # r_i for i = 1 .. K - 1 (r_K is never needed: h_K = w_K), padded to K columns.
  mass = jnp.sum(jnp.maximum(jnp.exp(log_w[:, 1:k, None] + target_logp[:, 1:k])
                             - jnp.exp(draft_logp[:, 1:k]), 0.0), axis=-1)         # [B, K - 1]
  mass = jnp.pad(mass, ((0, 0), (0, 1)))
  denominator = mass + 1.0 - weight[:, 1:]
  stop = jnp.where(denominator > 0,
                   jnp.clip(mass / jnp.where(denominator > 0, denominator, 1.0), 0.0, 1.0), 1.0)
  index = jnp.arange(1, k + 1)[None]                                              # i
  gamma = num_drafted[:, None]
  stop = jnp.where(index == gamma, weight[:, 1:], jnp.where(index < gamma, stop, 0.0))
  eta = jax.random.uniform(accept_key, (batch, k), minval=jnp.finfo(jnp.float32).tiny)
  num_accepted = jnp.max(jnp.where(eta < stop, index, 0), axis=1).astype(jnp.int32)

  p_next = target_logp[rows, num_accepted]                                        # [B, V]
  q_next = draft_logp[rows, jnp.minimum(num_accepted, k - 1)]
  rejected = num_accepted < num_drafted
  residual = residual_log_probs(p_next, q_next, log_w[rows, num_accepted])
  next_logp = jnp.where(rejected[:, None], residual, p_next)
  next_token = jax.random.categorical(next_key, next_logp, axis=-1).astype(jnp.int32)
  return num_accepted, next_token


def tree_accept(rng: jax.Array, node_tokens: jax.Array, parents: jax.Array,
                target_logp: jax.Array, depth: int, max_children: int,
                draft_logp: Optional[jax.Array] = None,
                typical: Optional[tuple[float, float]] = None,
                candidates: Optional[jax.Array] = None):
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
    candidates [B, N, C] given (with draft_logp): recursive rejection sampling without
      replacement (RRSw; Jeon et al. 2024, "Recursive Speculative Decoding", Algorithm
      1): candidates[b, i] are the tokens drawn, in draw order, WITHOUT replacement from
      q = draft_logp[b, i] (Gumbel-top-k; -1 = none drawn, e.g. a leaf). Try them in
      order: accept x with probability min(1, p(x) / q(x)); after a rejection p becomes
      norm(max(p - q, 0)) and q becomes q without x, renormalised (the distribution of
      the next draw). A drawn token that is not in the tree (a dynamic tree's reranking
      pruned it, a sparse tree skips its rank) may still be accepted: it is then the
      next token and the walk stops there. Candidates with q(x) = 0 (filtered tokens
      top-k had to return) are skipped. Children must be a subset of their parent's
      candidates (siblings are distinct tokens, so they are matched by token).
      Why this rule: the deterministic top-k rule above accepts only p's mass on the
      candidates, which at temperature 1 is small for a flat p; i.i.d. draws waste
      nodes on duplicate tokens. Drawing siblings without replacement keeps them
      distinct and RRSw accepts the first one with probability sum min(p, q), the
      chain's rate, and each further sibling adds to it (Jeon et al. report it at or
      above SpecInfer and SpecTr for the same number of draft tokens). Traversal
      verification (Weng et al. 2025, leaf-to-root, sequence-level) reports 2.2-5.7%
      longer acceptance than token-level tree verification, but it needs each path's
      sequence probabilities and a walk over every leaf, and it is stated for i.i.d.
      sibling draws; RRSw is local to a node, costs what the rule above costs (one
      residual per candidate), and fixes the larger loss, so it is the one built here.
  If every child is rejected, the next token is drawn from the last residual; at a
  leaf, the bonus token from p. Under greedy decoding (point masses) this walk follows
  the target's argmax; `accept` then takes `greedy_accept`, which does that without
  draws.

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
  rrsw = candidates is not None and typical is None
  if rrsw:
    if draft_logp is None:
      raise ValueError('Candidates drawn without replacement need their draft_logp.')
    keys = iter(jax.random.split(rng, depth * (candidates.shape[-1] + 1) + 1))
  for _ in range(depth):
    is_child = (parents == current[:, None]) & (jnp.arange(num_nodes) > 0)  # [B, N]
    q_parent = None if draft_logp is None else draft_logp[rows, current]
    if rrsw:
      found, chosen, p, accepted_token = _try_without_replacement(
          keys, node_tokens, is_child, candidates[rows, current], target_logp[rows, current],
          q_parent, alive, current)
    else:
      found, chosen, p = _try_children(keys, node_tokens, is_child, target_logp[rows, current],
                                       q_parent, alive, current, max_children, typical)
    stop = alive & ~found
    drawn = jax.random.categorical(next(keys), p).astype(jnp.int32)
    if rrsw:  # A drawn token outside the tree was accepted: it is the next token.
      drawn = jnp.where(accepted_token >= 0, accepted_token, drawn)
    next_token = jnp.where(stop, drawn, next_token)
    alive = alive & found
    current = jnp.where(found, chosen, current)
    path.append(jnp.where(found, chosen, 0))
  bonus = jax.random.categorical(next(keys), target_logp[rows, current]).astype(jnp.int32)
  next_token = jnp.where(alive, bonus, next_token)
  num_accepted = jnp.sum(jnp.stack(path[1:], axis=1) > 0, axis=1).astype(jnp.int32)
  return jnp.stack(path, axis=1), num_accepted, next_token



def _try_children(keys, node_tokens, is_child, p, q_parent, alive, current, max_children,
                  typical):
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
    if typical is not None:
      ok = jnp.exp(p_x) > threshold
    else:
      q = (jnp.where(jnp.arange(p.shape[-1]) == x[:, None], 0.0, -jnp.inf)
           if q_parent is None else q_parent)
      u = jax.random.uniform(next(keys), (batch,), minval=jnp.finfo(jnp.float32).tiny)
      ok = jnp.log(u) < p_x - q[rows, x]
    take = ok & exists & ~found & alive
    chosen = jnp.where(take, child, chosen)
    found = found | take
    if typical is None:  # Rows that rejected this child: the residual.
      rejected = exists & ~found & alive
      p = jnp.where(rejected[:, None], residual_log_probs(p, q), p)
  return found, chosen, p


def _try_without_replacement(keys, node_tokens, is_child, candidates, p, q, alive, current):
  """One level of tree_accept's RRSw rule at `current` [B]: candidates [B, C] drawn in
  order without replacement from q [B, V] (-1 = none), target p [B, V], is_child [B, N].
  Uses one key of `keys` per candidate. Returns (found [B]: an accepted candidate is a
  tree child, chosen [B] that child's node, p [B, V] after the rejected candidates,
  accepted_token [B]: an accepted candidate that is not in the tree, else -1)."""
  batch, num_candidates = candidates.shape
  rows = jnp.arange(batch)
  taken = jnp.zeros((batch,), bool)
  token = jnp.zeros((batch,), jnp.int32)
  for j in range(num_candidates):
    x = jnp.maximum(candidates[:, j], 0)
    q_x = q[rows, x]
    valid = (candidates[:, j] >= 0) & (q_x > -jnp.inf) & alive & ~taken
    u = jax.random.uniform(next(keys), (batch,), minval=jnp.finfo(jnp.float32).tiny)
    ok = valid & (jnp.log(u) < p[rows, x] - q_x)
    token = jnp.where(ok, x, token)
    taken = taken | ok
    rejected = valid & ~ok
    p = jnp.where(rejected[:, None], residual_log_probs(p, q), p)
    # The next draw's distribution: q without x, renormalised (none left if q(x) = 1).
    rest = jnp.log1p(-jnp.minimum(jnp.exp(q_x), 1.0))                          # [B]
    drop = (jnp.arange(q.shape[-1])[None] == x[:, None]) | (rest[:, None] == -jnp.inf)
    without = jnp.where(drop, -jnp.inf, q - rest[:, None])
    q = jnp.where(rejected[:, None], without, q)
  match = is_child & (node_tokens == token[:, None]) & taken[:, None]            # [B, N]
  found = jnp.any(match, axis=1)
  chosen = jnp.where(found, jnp.argmax(match, axis=1).astype(jnp.int32), current)
  return found, chosen, p, jnp.where(taken & ~found, token, -1)
