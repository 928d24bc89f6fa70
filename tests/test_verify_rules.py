"""The acceptance rules alone, on random (p, q) tables: block verification (Sun et al.
2025) against exact enumeration (losslessness with power, expected accepted length equal
to its analytic value and never below the token-level rule's), and hand-built tables with
exact outputs."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import proposal as proposal_lib
from decoding import trees, verify
from tests.test_speculative import _g_test

V, K = 4, 3


def _tables(seed, concentration=0.5, zeros=False):
  """Random position- and last-token-conditional tables: target P [K + 1, V, V] and draft
  Q [K, V, V] (row [i, x] the distribution after token x at draft step i). zeros: some
  entries 0 in both (as top-k / top-p filters leave them; each row keeps its argmax)."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(V, concentration), size=(K + 1, V))
  q = rng.dirichlet(np.full(V, concentration), size=(K, V))
  if zeros:
    for t in (p, q):
      cut = rng.random(t.shape) < 0.3
      cut &= t < t.max(-1, keepdims=True)
      t[cut] = 0.0
      t /= t.sum(-1, keepdims=True)
  return p, q


def _weights(p, q, x, rule):
  """Per drafted prefix x^i (i = 1 .. K) the chance it is accepted given x: the block
  rule's residual weight w_i, or the token rule's product of min(1, p / q)."""
  w, prev, out = 1.0, 0, []
  for i, t in enumerate(x):
    ratio = p[i, prev, t] / q[i, prev, t]
    w = min(w * ratio, 1.0) if rule == 'block' else w * min(ratio, 1.0)
    out.append(w)
    prev = t
  return out


def _analytic_tau(p, q, rule):
  """E[accepted] = sum_i sum_{x^i} Q(x^i) P(accept x^i | x^i) (root token 0)."""
  total = 0.0
  for x in itertools.product(range(V), repeat=K):
    qx, prev = 1.0, 0
    for i, t in enumerate(x):
      qx *= q[i, prev, t]
      prev = t
    if qx > 0:
      total += qx * sum(_weights(p, q, x, rule))
  return total


def _algorithm_tau(p, q):
  """E[accepted] by running block verification's stopping rule exactly: P(tau = i | x) =
  h_i prod_{j > i} (1 - h_j), with the h_i of the paper's Algorithm 2."""
  total = 0.0
  for x in itertools.product(range(V), repeat=K):
    qx, prev, prefix = 1.0, 0, [0]
    for i, t in enumerate(x):
      qx *= q[i, prev, t]
      prev = t
      prefix.append(t)
    if qx == 0:
      continue
    w = _weights(p, q, x, 'block')
    h = []
    for i in range(1, K + 1):
      if i == K:
        h.append(w[-1])
        continue
      r = np.maximum(w[i - 1] * p[i, prefix[i]] - q[i, prefix[i]], 0).sum()
      h.append(1.0 if r + 1 - w[i - 1] <= 0 else r / (r + 1 - w[i - 1]))
    tau = sum(i * h[i - 1] * np.prod([1 - hj for hj in h[i:]]) for i in range(1, K + 1))
    total += qx * tau
  return total


def _draft_and_verify(p, q, rows, seed, rule='block', num_drafted=K):
  """Drafts `rows` chains from the tables, verifies them with `rule` and completes each
  output to K + 1 tokens with the target -> (tokens [rows, K + 1], num_accepted [rows])."""
  rng = np.random.default_rng(seed)
  logp, logq = np.log(p + 1e-38), np.log(q + 1e-38)
  logp[p == 0], logq[q == 0] = -np.inf, -np.inf
  draft, prev = np.zeros((rows, K), np.int32), np.zeros(rows, np.int32)
  for i in range(K):
    cdf = np.cumsum(q[i, prev], axis=-1)
    draft[:, i] = np.minimum((rng.random((rows, 1)) > cdf).sum(-1), V - 1)
    prev = draft[:, i]
  context = np.concatenate([np.zeros((rows, 1), np.int32), draft], axis=1)    # [rows, K + 1]
  target = np.stack([logp[i, context[:, i]] for i in range(K + 1)], axis=1)
  drafted = np.stack([logq[i, context[:, i]] for i in range(K)], axis=1)
  fn = jax.jit(verify.block_accept if rule == 'block' else verify.chain_accept)
  n, nxt = fn(jax.random.PRNGKey(seed), jnp.asarray(draft), jnp.asarray(drafted),
              jnp.asarray(target), jnp.full((rows,), num_drafted, jnp.int32))
  n, nxt = np.asarray(n), np.asarray(nxt)
  out = np.zeros((rows, K + 1), np.int32)
  prev = np.zeros(rows, np.int32)
  for i in range(K + 1):
    cdf = np.cumsum(p[i, prev], axis=-1)
    completed = np.minimum((rng.random((rows, 1)) > cdf).sum(-1), V - 1)
    out[:, i] = np.where(i < n, draft[:, min(i, K - 1)], np.where(i == n, nxt, completed))
    prev = out[:, i]
  return out, n


def _exact_target(p):
  """{(x_1 .. x_{K+1}): probability} of the target's own samples from root 0."""
  exact = {}
  for x in itertools.product(range(V), repeat=K + 1):
    prob, prev = 1.0, 0
    for i, t in enumerate(x):
      prob *= p[i, prev, t]
      prev = t
    if prob > 0:
      exact[x] = prob
  return exact


def test_block_verification_never_accepts_fewer_and_matches_its_analytic_value():
  gains = []
  for seed in range(40):
    p, q = _tables(seed, zeros=seed % 2 == 1)
    block, token = _analytic_tau(p, q, 'block'), _analytic_tau(p, q, 'token')
    assert block >= token - 1e-12, seed
    np.testing.assert_allclose(_algorithm_tau(p, q), block, rtol=1e-9)
    gains.append(block - token)
  assert max(gains) > 0.02, 'block verification should accept strictly more on some tables'
  rows = 100_000
  for seed in (0, 1, 7):  # The implementation's measured mean, for block and token rules.
    p, q = _tables(seed, zeros=seed % 2 == 1)
    for rule in ('block', 'token'):
      _, n = _draft_and_verify(p, q, rows, seed, rule)
      assert abs(n.mean() - _analytic_tau(p, q, rule)) < 4 * n.std() / np.sqrt(rows), (seed, rule)


@pytest.mark.parametrize('seed,zeros', [(0, False), (4, True)], ids=['dense', 'filtered'])
def test_block_verification_is_lossless_and_a_wrong_residual_fails(seed, zeros, monkeypatch):
  p, q = _tables(seed, zeros=zeros)
  exact = _exact_target(p)
  rows = 200_000
  out, n = _draft_and_verify(p, q, rows, seed)
  assert 0 < n.mean() < K
  assert _g_test(out, exact) > 1e-3
  # Ragged: rows that drafted fewer tokens (num_drafted = 1) are lossless too.
  assert _g_test(_draft_and_verify(p, q, rows, seed + 1, num_drafted=1)[0], exact) > 1e-3
  if not zeros:  # Power: the residual without block verification's weight w_tau is wrong.
    residual = verify.residual_log_probs
    jax.clear_caches()  # block_accept is jitted: retrace it with the wrong residual.
    monkeypatch.setattr(verify, 'residual_log_probs', lambda t, d, w=None: residual(t, d))
    try:
      assert _g_test(_draft_and_verify(p, q, rows, seed + 2)[0], exact) < 1e-3
    finally:
      monkeypatch.undo()
      jax.clear_caches()


def test_hand_built_block_verification_tables():
  """V = 2, K = 2. Step 0: p = (.5, .5), q = (1, 0), so X_1 = 0 and w_1 = 1/2 (the
  token rule keeps X_1 half the time). After X_1 = 0: p = (0, 1), q = (.5, .5), so
  r_1 = 0 and h_1 = 0. X_2 = 1: w_2 = min(.5 * 1 / .5, 1) = 1: the block is kept whole,
  then the bonus from p_2 (a point mass on 1). X_2 = 0: w_2 = 0: nothing is kept and the
  residual norm(max(p_0 - q_0, 0)) is the point mass on 1. Row 3: p = q point masses
  with one token drafted (ragged): it is kept and the bonus follows."""
  log = lambda rows: jnp.log(jnp.asarray(rows, jnp.float32))
  draft = jnp.asarray([[0, 1], [0, 0], [1, 0]])
  draft_logp = log([[[1, 0], [.5, .5]], [[1, 0], [.5, .5]], [[0, 1], [1, 0]]])
  target_logp = log([[[.5, .5], [0, 1], [0, 1]], [[.5, .5], [0, 1], [0, 1]],
                     [[0, 1], [1, 0], [1, 0]]])
  for seed in range(5):
    n, nxt = verify.block_accept(jax.random.PRNGKey(seed), draft, draft_logp, target_logp,
                                 jnp.asarray([2, 2, 1]))
    np.testing.assert_array_equal(n, [2, 0, 1])
    np.testing.assert_array_equal(nxt, [1, 1, 0])
  # The token-level rule keeps the first row's block only about half the time.
  n = [int(verify.chain_accept(jax.random.PRNGKey(s), draft[:1], draft_logp[:1],
                               target_logp[:1], jnp.asarray([2]))[0][0]) for s in range(40)]
  assert 5 < n.count(2) < 35 and n.count(2) + n.count(0) == 40


def test_an_unknown_chain_rule_is_a_clear_error():
  from decoding.speculative import SpeculativeConfig
  with pytest.raises(ValueError, match='chain_rule must be one of block, token'):
    SpeculativeConfig(4, 8, chain_rule='tokens')


def test_hand_built_tables_for_candidates_drawn_without_replacement():
  """Root with tree children node 1 and node 2; candidates drawn at the root in order.
  Row 0: candidates (0, 1, 3), q = (.5, .25, 0, .25), p = (0, 1, 0, 0). Token 0 is
  rejected (p = 0); p becomes norm(max(p - q, 0)) = (0, 1, 0, 0) and q without 0 is
  (0, .5, 0, .5); token 1 is accepted for sure (p / q = 2) but is not in the tree
  (pruned): it is the next token, nothing is accepted. Row 1: p = (0, 0, 0, 1): 0 and 1
  are rejected, then q = (0, 0, 0, 1) and 3 (node 2) is accepted; the bonus comes from
  node 2's p, a point mass on 2. Row 2: candidates (0, 2), q = (1, 0, 0, 0), p = (0, 0,
  1, 0): 0 is rejected, 2 has q = 0 (a filtered token top-k returned) and is skipped,
  so the next token is drawn from the residual, the point mass on 2, even though node 2
  carries token 2."""
  log = lambda rows: jnp.log(jnp.asarray(rows, jnp.float32))
  node_tokens = jnp.asarray([[3, 0, 3], [3, 0, 3], [3, 0, 2]])
  parents = np.asarray([-1, 0, 0])
  candidates = jnp.asarray([[[0, 1, 3], [-1] * 3, [-1] * 3]] * 2 + [[[0, 2, -1], [-1] * 3,
                                                                    [-1] * 3]])
  q_root = [[.5, .25, 0, .25], [.5, .25, 0, .25], [1, 0, 0, 0]]
  draft_logp = log([[q, [.25] * 4, [.25] * 4] for q in q_root])
  target_logp = log([[[0, 1, 0, 0], [.25] * 4, [0, 0, 1, 0]],
                     [[0, 0, 0, 1], [.25] * 4, [0, 0, 1, 0]],
                     [[0, 0, 1, 0], [.25] * 4, [.25] * 4]])
  for seed in range(5):
    path, n, nxt = verify.tree_accept(jax.random.PRNGKey(seed), node_tokens, parents,
                                      target_logp, 1, 2, draft_logp, candidates=candidates)
    np.testing.assert_array_equal(path, [[0, 0], [0, 2], [0, 0]])
    np.testing.assert_array_equal(n, [0, 1, 0])
    np.testing.assert_array_equal(nxt, [1, 2, 2])


def test_rrsw_accepts_more_than_the_top_k_rule_on_a_flat_target():
  """One level, 2 candidates, exact acceptance chances on random tables: drawn without
  replacement (RRSw) vs the draft's top-2 (point-mass rule: p's mass on them), measured.
  A flat target and a matching draft: RRSw accepts nearly always, top-2 about 2 / V."""
  v, rows = 8, 50_000
  p = np.full(v, 1 / v)
  q = p.copy()
  logp = jnp.log(jnp.asarray(np.broadcast_to(p, (rows, 3, v)), jnp.float32))
  logq = jnp.log(jnp.asarray(np.broadcast_to(q, (rows, 3, v)), jnp.float32))
  from decoding.sampling import sample_without_replacement
  drawn = sample_without_replacement(jax.random.PRNGKey(0), logq[:, 0], 2)          # [rows, 2]
  tokens = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), drawn], axis=1)
  candidates = jnp.concatenate([drawn[:, None], jnp.full((rows, 2, 2), -1)], axis=1)
  _, n, _ = verify.tree_accept(jax.random.PRNGKey(1), tokens, np.asarray([-1, 0, 0]), logp, 1,
                               2, logq, candidates=candidates)
  assert float(jnp.mean(n)) > 0.99
  top2 = jnp.broadcast_to(jnp.asarray([0, 1, 2]), (rows, 3))
  _, n, _ = verify.tree_accept(jax.random.PRNGKey(1), top2, np.asarray([-1, 0, 0]), logp, 1, 2)
  assert abs(float(jnp.mean(n)) - 2 / v) < 0.01


def _tree_tables(seed):
  """Target P0 [V], P1 [V, V], P2 [V, V] (after the root, after x1, after x2) and draft
  Q0 [V], Q1 [V, V]; some entries 0 in both, as filters leave them."""
  rng = np.random.default_rng(seed)
  p = [rng.dirichlet(np.full(V, .7)), rng.dirichlet(np.full(V, .7), V),
       rng.dirichlet(np.full(V, .7), V)]
  q = [rng.dirichlet(np.full(V, .7)), rng.dirichlet(np.full(V, .7), V)]
  p[1][1, 3] = q[1][1, 3] = 0.0
  p[1][1] /= p[1][1].sum()
  q[1][1] /= q[1][1].sum()
  return p, q


def _tree_draft_and_verify(p, q, rows, seed, rule='rrsw'):
  """A 2-level tree per row: 3 root candidates drawn without replacement from Q0, the
  first 2 in the tree (nodes 1, 2; the third pruned), each with 2 candidates drawn from
  Q1, the first in the tree (nodes 3, 4). Verified by `rule` ('rrsw', or 'iid': the
  i.i.d. rule misapplied to distinct draws) and completed to 3 tokens by the target."""
  from decoding.sampling import sample_without_replacement
  lg = lambda a: jnp.log(jnp.asarray(a, jnp.float32))
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  root_c = sample_without_replacement(keys[0], jnp.broadcast_to(lg(q[0]), (rows, V)), 3)
  child_q = lg(q[1])[root_c[:, :2]]                                           # [rows, 2, V]
  child_c = sample_without_replacement(keys[1], child_q, 2)                   # [rows, 2, 2]
  tokens = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), root_c[:, :2], child_c[:, :, 0]], 1)
  parents = np.asarray([-1, 0, 0, 1, 2])
  none = jnp.full((rows, 2, 3), -1, jnp.int32)
  candidates = jnp.concatenate([root_c[:, None], jnp.pad(child_c, ((0, 0), (0, 0), (0, 1)),
                                                           constant_values=-1), none], axis=1)
  target = jnp.concatenate([jnp.broadcast_to(lg(p[0]), (rows, 1, V)), lg(p[1])[root_c[:, :2]],
                            lg(p[2])[child_c[:, :, 0]]], axis=1)                # [rows, 5, V]
  draft = jnp.concatenate([jnp.broadcast_to(lg(q[0]), (rows, 1, V)), child_q,
                           jnp.zeros((rows, 2, V))], axis=1)
  path, n, nxt = verify.tree_accept(keys[2], tokens, parents, target, 2, 2, draft,
                                    candidates=candidates if rule == 'rrsw' else None)
  path, n, nxt, tokens = map(np.asarray, (path, n, nxt, tokens))
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, 3), np.int32)
  for i in range(3):
    table = p[i] if i == 0 else p[i][out[:, i - 1]]
    completed = np.minimum((rng.random((rows, 1)) > np.cumsum(table, -1)).sum(-1), V - 1)
    accepted = tokens[np.arange(rows), path[:, min(i + 1, 2)]]
    out[:, i] = np.where(i < n, accepted, np.where(i == n, nxt, completed))
  return out, n


def test_rrsw_is_lossless_on_random_trees_and_the_iid_rule_on_distinct_draws_is_not():
  p, q = _tree_tables(5)
  exact = {}
  for x in itertools.product(range(V), repeat=3):
    prob = p[0][x[0]] * p[1][x[0], x[1]] * p[2][x[1], x[2]]
    if prob > 0:
      exact[x] = prob
  rows = 200_000
  out, n = _tree_draft_and_verify(p, q, rows, 0)
  assert 0 < n.mean() < 2
  assert _g_test(out, exact) > 1e-3
  assert _g_test(_tree_draft_and_verify(p, q, rows, 1, rule='iid')[0], exact) < 1e-3


def test_greedy_accept_equals_every_rule_under_point_masses():
  """The greedy shortcut (no draws, no vocabulary pass per level) keeps the same path,
  count and next token as the sampling rules fed point-mass targets: chains drawn from a
  draft (block and token rules), deterministic chains with num_drafted, and trees with
  duplicate sibling tokens (i.i.d. draws), on random proposals."""
  rng = np.random.default_rng(0)
  vocab, batch = 5, 64
  point = lambda ids: jnp.where(jnp.arange(vocab) == ids[..., None], 0.0, -jnp.inf)
  for trial in range(6):
    k = 4
    root = rng.integers(0, vocab, batch)
    # Few symbols, so drafts often match the target's argmax (long accepted prefixes).
    drafted = rng.integers(0, 2, (batch, k))
    target_ids = jnp.asarray(rng.integers(0, 2, (batch, k + 1)), jnp.int32)
    draft_logp = jnp.log(jnp.asarray(rng.dirichlet(np.ones(vocab), (batch, k + 1)),
                                     jnp.float32))
    num_drafted = jnp.asarray(rng.integers(0, k + 1, batch), jnp.int32)
    chains = [proposal_lib.Proposal.chain(jnp.asarray(root), jnp.asarray(drafted),
                                          draft_logp=draft_logp),
              proposal_lib.Proposal.chain(jnp.asarray(root), jnp.asarray(drafted),
                                          num_drafted=num_drafted)]
    spec = trees.TreeSpec((2, 2, 1))
    tree_tokens = jnp.asarray(rng.integers(0, 2, (batch, spec.num_nodes)), jnp.int32)
    tree = proposal_lib.Proposal.static_tree(spec, tree_tokens)
    tree_ids = jnp.asarray(rng.integers(0, 2, (batch, spec.num_nodes)), jnp.int32)
    key = jax.random.PRNGKey(trial)
    cases = [(chains[0], target_ids, lambda p, lp: verify.block_accept(
                 key, p.tokens[:, 1:], p.draft_logp[:, :k], lp, jnp.full((batch,), k))),
             (chains[0], target_ids, lambda p, lp: verify.chain_accept(
                 key, p.tokens[:, 1:], p.draft_logp[:, :k], lp, jnp.full((batch,), k))),
             (chains[1], target_ids, None), (tree, tree_ids, None)]
    for proposal, ids, rule in cases:
      path, count, nxt = verify.greedy_accept(proposal, ids)
      if rule is None:   # the tree walk with point masses
        parents = jnp.broadcast_to(jnp.asarray(proposal.parents), ids.shape)
        if proposal.num_drafted is not None:
          nodes = jnp.arange(ids.shape[1])[None]
          parents = jnp.where(nodes <= proposal.num_drafted[:, None], parents, -2)
        ref_path, ref_count, ref_next = verify.tree_accept(
            key, proposal.tokens, parents, point(ids), proposal.depth,
            proposal.max_children)
        np.testing.assert_array_equal(path, ref_path)
      else:
        ref_count, ref_next = rule(proposal, point(ids))
      np.testing.assert_array_equal(count, ref_count)
      np.testing.assert_array_equal(nxt, ref_next)
      assert int(jnp.max(count)) >= 2   # the shortcut was exercised past the first level
