"""Draft trees, in one home: static shapes, EAGLE-2 dynamic growth, filling a static
tree from ranked candidates, growing a static tree from measured acceptance (tuning),
and the slots an accepted path moves between. (The tree attention mask is
models.masks.tree_mask, with every other mask.)

A tree has N nodes; node 0 is the root: the last committed token, whose logits
propose the first level. Nodes are in topological order (a parent before its
children), and siblings carry distinct tokens where the draft picks them by top-k.

In a cache, node i sits in slot root_slot + i and at position root_slot + depth(i);
it attends to the committed prefix (slots < root_slot) and to its ancestors,
itself included (the tree attention mask of SpecInfer / Medusa).

Three kinds of tree:
  TreeSpec         static: every node at depth d has branching[d] children, the same
                   shape every round (node j's children are a contiguous range).
  SparseTree       static, any shape: nodes named by their paths of sibling ranks
                   (Medusa's "choices"; (0, 1) is the best first-level candidate's
                   second-best child), e.g. tuned on validation data (launch.tune_tree).
  DynamicTreeSpec  EAGLE-2 (Li et al. 2024): the draft expands, level by level, the
                   top_k nodes of highest cumulative draft log-probability, each into
                   its top_k children; then the `budget` best nodes of everything drafted
                   are kept (reranking). The shape differs per row and per round; the
                   arrays describing it (tokens, parents, depths) have fixed sizes.
  BestFirstTreeSpec DDTree (Ringel et al. 2026): from ONE call of a parallel drafter's
                   per-position distributions, the `budget` most probable prefixes under
                   their product (best_first_tree); per row and per round, like a dynamic
                   tree.
"""
import collections
import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from decoding.sampling import sample_without_replacement


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  branching: tuple[int, ...]   # children per node at depth 0, 1, ... (D = len)

  def __post_init__(self):
    if not self.branching or min(self.branching) < 1:
      raise ValueError(f'A tree needs >= 1 level and >= 1 child per node; got {self.branching}.')

  def __str__(self) -> str:
    return ','.join(map(str, self.branching))

  @property
  def depth(self) -> int:
    return len(self.branching)

  @property
  def max_children(self) -> int:
    return max(self.branching)

  @functools.cached_property
  def level_starts(self) -> tuple[int, ...]:
    """Index of the first node of each depth 0 .. D, and N at the end."""
    starts, width = [0, 1], 1
    for b in self.branching:
      width *= b
      starts.append(starts[-1] + width)
    return tuple(starts)

  @property
  def num_nodes(self) -> int:
    return self.level_starts[-1]

  @property
  def cache_slots(self) -> int:
    """Cache slots a round uses from the root on (nodes sit at root + index)."""
    return self.num_nodes

  @functools.cached_property
  def parents(self) -> np.ndarray:
    """[N] int: parent of each node (-1 for the root)."""
    parents = [-1]
    for d, b in enumerate(self.branching):
      parents += [p for p in range(self.level_starts[d], self.level_starts[d + 1])
                  for _ in range(b)]
    return np.asarray(parents)

  @functools.cached_property
  def depths(self) -> np.ndarray:
    """[N] int: depth of each node (root 0)."""
    return np.concatenate([[d] * (self.level_starts[d + 1] - self.level_starts[d])
                           for d in range(self.depth + 1)]).astype(np.int32)

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    """[N, N] bool: ancestors[i, j] iff j is i or an ancestor of i."""
    return _ancestors(self.parents)

  @functools.cached_property
  def ranks(self) -> np.ndarray:
    """[N] int: each node's rank among its siblings (root 0): a top-k index."""
    ranks = [0]
    for d, b in enumerate(self.branching):
      ranks += [r for _ in range(self.level_starts[d], self.level_starts[d + 1]) for r in range(b)]
    return np.asarray(ranks, np.int32)


def _ancestors(parents: np.ndarray) -> np.ndarray:
  out = np.eye(len(parents), dtype=bool)
  for i in range(1, len(parents)):
    out[i] |= out[parents[i]]
  return out


@dataclasses.dataclass(frozen=True)
class SparseTree:
  """A static tree of any shape: each non-root node is its path of sibling ranks from
  the root, e.g. ((0,), (1,), (0, 0)): the two best first-level candidates and the best
  child of the first. Every prefix of a path must be a node too. Nodes are ordered by
  depth, then path, so parents come first."""
  paths: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    paths = set(self.paths)
    if not paths or len(paths) != len(self.paths) or () in paths:
      raise ValueError(f'A sparse tree needs distinct, non-empty node paths; got {self.paths}.')
    for path in paths:
      if min(path) < 0 or (len(path) > 1 and path[:-1] not in paths):
        raise ValueError(f'Sparse tree node {path}: ranks must be >= 0 and its parent '
                         f'{path[:-1]} must be a node too.')
    object.__setattr__(self, 'paths', tuple(sorted(paths, key=lambda p: (len(p), p))))

  def __str__(self) -> str:
    return 'paths:' + ';'.join('.'.join(map(str, p)) for p in self.paths)

  @property
  def depth(self) -> int:
    return len(self.paths[-1])

  @property
  def num_nodes(self) -> int:
    return len(self.paths) + 1

  @property
  def cache_slots(self) -> int:
    return self.num_nodes

  @property
  def max_children(self) -> int:
    return int(np.max(np.bincount(self.parents[1:])))

  @functools.cached_property
  def parents(self) -> np.ndarray:
    index = {p: i + 1 for i, p in enumerate(self.paths)}
    return np.asarray([-1] + [index.get(p[:-1], 0) for p in self.paths])

  @functools.cached_property
  def depths(self) -> np.ndarray:
    return np.asarray([0] + [len(p) for p in self.paths], np.int32)

  @functools.cached_property
  def ranks(self) -> np.ndarray:
    return np.asarray([0] + [p[-1] for p in self.paths], np.int32)

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    return _ancestors(self.parents)


@dataclasses.dataclass(frozen=True)
class DynamicTreeSpec:
  """EAGLE-2's dynamic tree: expand `top_k` nodes per level into `top_k` children each,
  for `depth` levels; verify the `budget` nodes of highest cumulative draft
  log-probability (a connected subtree: a child never scores above its parent)."""
  top_k: int
  depth: int
  budget: int

  def __post_init__(self):
    if self.top_k < 1 or self.depth < 1:
      raise ValueError(f'A dynamic tree needs top_k >= 1 and depth >= 1; got {self}.')
    if not 1 <= self.budget <= self.pool_size:
      raise ValueError(f'Dynamic tree budget must be in [1, {self.pool_size}] (the nodes '
                       f'top_k={self.top_k} and depth={self.depth} draft); got {self.budget}.')

  def __str__(self) -> str:
    return f'dynamic:{self.top_k},{self.depth},{self.budget}'

  @property
  def max_children(self) -> int:
    return self.top_k

  @property
  def pool_size(self) -> int:
    """Nodes drafted per round: top_k at depth 1, top_k * top_k at each deeper level."""
    return self.top_k + (self.depth - 1) * self.top_k ** 2

  @property
  def num_nodes(self) -> int:
    return self.budget + 1

  @property
  def expanded_slots(self) -> int:
    """Draft cache slots of the expansion: the root and top_k nodes per level < depth."""
    return 1 + (self.depth - 1) * self.top_k

  @property
  def cache_slots(self) -> int:
    return max(self.num_nodes, self.expanded_slots, self.depth + 1)

  @functools.cached_property
  def pool_depths(self) -> np.ndarray:
    """[P] int: depth of each drafted node, in drafting order (shallow first)."""
    return np.asarray([1] * self.top_k + [d for d in range(2, self.depth + 1)
                                          for _ in range(self.top_k ** 2)], np.int32)


@dataclasses.dataclass(frozen=True)
class BestFirstTreeSpec:
  """DDTree's tree (Ringel et al. 2026, "Accelerating Speculative Decoding with Block
  Diffusion Draft Trees", arXiv 2604.12989, section 3): `budget` nodes grown best-first
  from a parallel drafter's per-position distributions, each node's children among its
  depth's `top_k` most probable tokens. Its depth is the drafter's block (the drafted
  positions), so the range of budget is checked against it (check_depth)."""
  budget: int
  top_k: int = 4

  def __post_init__(self):
    if self.budget < 1 or self.top_k < 1:
      raise ValueError(f'A best-first tree needs budget >= 1 and top_k >= 1; got {self}.')

  def __str__(self) -> str:
    return f'best:{self.budget},{self.top_k}'

  @property
  def max_children(self) -> int:
    return self.top_k

  @property
  def num_nodes(self) -> int:
    return self.budget + 1

  @property
  def cache_slots(self) -> int:
    return self.num_nodes

  def max_budget(self, depth: int) -> int:
    """The most nodes `depth` levels of `top_k` candidates can hold: sum_d top_k^d."""
    return sum(self.top_k ** d for d in range(1, depth + 1))

  def check_depth(self, depth: int) -> None:
    """Raises ValueError unless 1 <= budget <= max_budget(depth)."""
    if not 1 <= self.budget <= self.max_budget(depth):
      raise ValueError(f'Best-first tree budget must be in [1, {self.max_budget(depth)}] (the '
                       f'nodes {depth} drafted positions of top_k={self.top_k} candidates '
                       f'hold); got {self.budget}.')


def best_first_tree(spec: BestFirstTreeSpec, root_token: jax.Array, scores: jax.Array):
  """DDTree's best-first construction (Ringel et al. 2026, section 3, the heap algorithm)
  from per-position log-probabilities.

  root_token: [B] the last committed token; scores: [B, D, V] the drafter's
  log-probabilities for drafted positions 1 .. D (one call; positions independent given
  the context). A node is a prefix (x_1 .. x_d); its score, the surrogate of its chance
  to be accepted, is sum_i scores[i, x_i]. The `budget` best prefixes form a tree (a
  prefix scores at least as high as its extensions), found exactly by the heap
  enumeration: pop the best candidate, make it node i, push its next sibling (the next
  token of its depth's ranked list, same parent) and its first child (the best token of
  the next depth). The heap is a fixed array of 2 budget + 1 candidates and pop is an
  argmax (budget is small), so the loop has static shapes. Nodes come out best first,
  hence parents before children.

  Returns (node_tokens [B, N], parents [B, N] (-1 for the root), depths [B, N]) with
  N = budget + 1; siblings are distinct tokens (deterministic candidates: verify with
  the point-mass rule, draft_logp None). Raises ValueError for a budget out of range.
  """
  batch, depth, _ = scores.shape
  spec.check_depth(depth)
  k, budget = min(spec.top_k, scores.shape[-1]), spec.budget
  # Finite floor: -inf - (-inf) never forms, and filtered tokens just rank last.
  top_scores, top_tokens = jax.lax.top_k(jnp.maximum(scores, -1e30), k)     # [B, D, k]
  pool = 2 * budget + 1
  rows = jnp.arange(batch)
  cand = dict(parent=jnp.zeros((batch, pool), jnp.int32),
              depth=jnp.ones((batch, pool), jnp.int32),     # 1-based
              rank=jnp.zeros((batch, pool), jnp.int32),
              base=jnp.zeros((batch, pool), jnp.float32),   # the parent's score
              live=jnp.zeros((batch, pool), bool).at[:, 0].set(True))
  nodes = dict(token=jnp.zeros((batch, budget + 1), jnp.int32).at[:, 0].set(root_token),
               parent=jnp.full((batch, budget + 1), -1, jnp.int32),
               depth=jnp.zeros((batch, budget + 1), jnp.int32))

  def step(i, carry):
    cand, nodes = carry
    own = top_scores[rows[:, None], cand['depth'] - 1, cand['rank']]         # [B, pool]
    best = jnp.argmax(jnp.where(cand['live'], cand['base'] + own, -jnp.inf), axis=1)
    pick = {name: value[rows, best] for name, value in cand.items()}
    score = pick['base'] + own[rows, best]
    node = i + 1
    nodes = dict(token=nodes['token'].at[:, node].set(
                     top_tokens[rows, pick['depth'] - 1, pick['rank']]),
                 parent=nodes['parent'].at[:, node].set(pick['parent']),
                 depth=nodes['depth'].at[:, node].set(pick['depth']))
    live = cand['live'].at[rows, best].set(False)
    sibling, child = 2 * i + 1, 2 * i + 2
    new = dict(parent=(pick['parent'], jnp.full((batch,), node, jnp.int32)),
               depth=(pick['depth'], pick['depth'] + 1),
               rank=(pick['rank'] + 1, jnp.zeros((batch,), jnp.int32)),
               base=(pick['base'], score))
    cand = {name: value.at[:, sibling].set(new[name][0]).at[:, child].set(new[name][1])
            for name, value in cand.items() if name != 'live'}
    cand['live'] = live.at[:, sibling].set(pick['rank'] + 1 < k).at[:, child].set(
        pick['depth'] < depth)
    return cand, nodes

  _, nodes = jax.lax.fori_loop(0, budget, step, (cand, nodes))
  return nodes['token'], nodes['parent'], nodes['depth']


def label(spec: str) -> str:
  """A short name of a tree spec string for tables: sparse trees by their size."""
  if spec.startswith('paths:'):
    return f'tuned, {spec.count(";") + 1} nodes'
  return spec


def parse(spec: str):
  """'3,2,1' -> TreeSpec((3, 2, 1)); 'dynamic:8,5,48' -> DynamicTreeSpec(top_k=8,
  depth=5, budget=48); 'paths:0;1;0.0' -> SparseTree(((0,), (1,), (0, 0)));
  'best:16' or 'best:16,4' -> BestFirstTreeSpec(budget=16, top_k=4)."""
  try:
    if spec.startswith('best:'):
      values = [int(x) for x in spec[len('best:'):].split(',')]
      if len(values) > 2:
        raise ValueError('best: takes BUDGET or BUDGET,TOP_K')
      return BestFirstTreeSpec(*values)
    if spec.startswith('paths:'):
      return SparseTree(tuple(tuple(int(r) for r in path.split('.'))
                              for path in spec[len('paths:'):].split(';')))
    if spec.startswith('dynamic:'):
      top_k, depth, budget = (int(x) for x in spec[len('dynamic:'):].split(','))
      return DynamicTreeSpec(top_k, depth, budget)
    return TreeSpec(tuple(int(x) for x in spec.split(',')))
  except ValueError as e:
    raise ValueError(f'Bad tree spec {spec!r}: expected children per level, like "3,2,1", '
                     f'"dynamic:TOP_K,DEPTH,BUDGET", like "dynamic:8,5,48", sparse node '
                     f'paths, like "paths:0;1;0.0", or a best-first tree "best:BUDGET[,TOP_K]", '
                     f'like "best:16,4". ({e})') from e


def ancestors_from_parents(parents: jax.Array, depth: int) -> jax.Array:
  """[B, N, N] bool: [b, i, j] iff node j is i or an ancestor of i in row b's tree.

  parents: [B, N] int, -1 for the root (node 0); a tree at most `depth` deep.
  """
  num_nodes = parents.shape[1]
  current = jnp.broadcast_to(jnp.arange(num_nodes), parents.shape)
  out = jax.nn.one_hot(current, num_nodes, dtype=bool)
  for _ in range(depth):  # Walk every node one step up; the root stays put.
    current = jnp.maximum(jnp.take_along_axis(parents, current, axis=1), 0)
    out |= jax.nn.one_hot(current, num_nodes, dtype=bool)
  return out


def path_slots(root_slots: jax.Array, path: jax.Array, num_accepted: jax.Array,
               capacity: int) -> tuple[jax.Array, jax.Array]:
  """(source, target) [B, D] cache slots that move an accepted path's keys/values from
  their node slots (root + node) into sequence order (root + depth); slots past the
  accepted depth target `capacity`, i.e. are dropped (KVCache.move_slots)."""
  depth = jnp.arange(1, path.shape[1])[None]
  source = root_slots[:, None] + path[:, 1:]
  target = jnp.where(depth <= num_accepted[:, None], root_slots[:, None] + depth, capacity)
  return source, target


def grow_dynamic_tree(spec: DynamicTreeSpec, root_token: jax.Array, root_scores: jax.Array,
                      expand: Callable, carry, key: Optional[jax.Array] = None):
  """EAGLE-2 expansion and reranking, for any drafter.

  root_token: [B] the last committed token; root_scores: [B, V] the drafter's
  log-probabilities for the first level (only real vocabulary ids, V = vocab size).
  expand(carry, level, tokens [B, k], ancestors [B, k, R], parent [B, k]) ->
  (carry, scores [B, k, V]) feeds the k frontier nodes of depth `level` (1 .. depth - 1)
  to the drafter and returns their children's log-probabilities. Frontier node j of
  depth d sits in the drafter's slot root + 1 + (d - 1) * k + j; `ancestors` marks, over
  those R = spec.expanded_slots slots (root first), what each fed node may attend to;
  `parent` is each fed node's parent among the previous call's fed nodes (0, the root,
  at level 1), for drafters that carry a state per node (EAGLE's features).

  Returns (carry, node_tokens [B, N], parents [B, N] (-1 for the root), depths [B, N],
  ranks [B, N]), N = budget + 1, nodes in topological order; ranks: each node's place in
  the reranking (0 = the highest cumulative draft log-probability; the root -1), so the
  tree of any smaller budget b is exactly the nodes of rank < b (launch/autotune.py
  prices budgets from the ranks of accepted nodes).

  key given (sampling; verify.tree_accept's rule without replacement): each expanded
  node's top_k children are drawn without replacement from its scores, which must then
  be the processed distribution (sampling.sample_without_replacement), instead of
  being its top_k; ranking and reranking still use the cumulative draft
  log-probabilities. Then also returns draft_logp [B, N, V] (each node's scores, the
  distribution its children were drawn from) and candidates [B, N, top_k] (each
  node's drawn children in draw order, -1 for a node not expanded): reranking may
  prune some drawn children, and the verifier must still see them.
  """
  k, batch = spec.top_k, root_token.shape[0]
  keys = None if key is None else iter(jax.random.split(key, spec.depth))

  def children(scores_, parent_key):  # -> (scores, tokens) [..., k]
    if parent_key is None:
      return jax.lax.top_k(scores_, k)
    drawn = sample_without_replacement(parent_key, scores_, k)
    return jnp.take_along_axis(scores_, drawn, axis=-1), drawn

  scores, tokens = children(root_scores, None if keys is None else next(keys))   # [B, k]
  expanded_scores, expanded_children = [root_scores[:, None]], [tokens[:, None]]
  # Per pool node, its row among the expanded ones (0 = the root), or -1.
  expanded_row = [jnp.broadcast_to(1 + jnp.arange(k) if spec.depth > 1
                                   else jnp.full((k,), -1), (batch, k))]
  pool_scores, pool_tokens = [scores], [tokens]
  pool_parents = [jnp.full((batch, k), -1, jnp.int32)]                      # pool index
  frontier = jnp.broadcast_to(jnp.arange(k), (batch, k))                   # pool index
  parent = jnp.zeros((batch, k), jnp.int32)                                  # in the last feed
  slots = 1 + jnp.arange(k)
  ancestors = jnp.broadcast_to(jax.nn.one_hot(0, spec.expanded_slots, dtype=bool)
                               | jax.nn.one_hot(slots, spec.expanded_slots, dtype=bool),
                               (batch, k, spec.expanded_slots))
  for level in range(1, spec.depth):
    carry, child_scores = expand(carry, level, tokens, ancestors, parent)  # [B, k, V]
    top_scores, top_tokens = children(child_scores, None if keys is None else next(keys))
    expanded_scores.append(child_scores)
    expanded_children.append(top_tokens)                                   # [B, k, k]
    # A path's score is its cumulative log-probability; adding a log-probability <= 0
    # never raises it, so a child never outranks its parent.
    candidate_scores = (scores[:, :, None] + top_scores).reshape(batch, k * k)
    candidate_tokens = top_tokens.reshape(batch, k * k)
    pool_scores.append(candidate_scores)
    pool_tokens.append(candidate_tokens)
    pool_parents.append(jnp.repeat(frontier, k, axis=1))
    expanded_row.append(jnp.full((batch, k * k), -1, jnp.int32))
    if level + 1 < spec.depth:  # The next frontier: the k best new nodes.
      offset = k + (level - 1) * k * k
      scores, chosen = jax.lax.top_k(candidate_scores, k)                  # [B, k]
      expanded_row[-1] = expanded_row[-1].at[jnp.arange(batch)[:, None], chosen].set(
          1 + level * k + jnp.arange(k, dtype=jnp.int32)[None])
      tokens = jnp.take_along_axis(candidate_tokens, chosen, axis=1)
      frontier = offset + chosen
      parent = (chosen // k).astype(jnp.int32)
      parent_rows = jnp.take_along_axis(ancestors, parent[:, :, None], axis=1)
      slots = 1 + level * k + jnp.arange(k)
      ancestors = parent_rows | jax.nn.one_hot(slots, spec.expanded_slots, dtype=bool)[None]

  # Reranking: the budget best of the whole pool. top_k breaks ties toward the lower
  # index, i.e. the shallower node, so a kept node's parent is always kept; sorting
  # the kept pool indices puts parents before children.
  pool_scores = jnp.concatenate(pool_scores, axis=1)                       # [B, P]
  best = jax.lax.top_k(pool_scores, spec.budget)[1]                        # [B, M] by rank
  order = jnp.argsort(best, axis=1)
  kept = jnp.take_along_axis(best, order, axis=1)                           # [B, M] sorted
  ranks = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), order.astype(jnp.int32)], 1)
  kept_tokens = jnp.take_along_axis(jnp.concatenate(pool_tokens, axis=1), kept, axis=1)
  parent_pool = jnp.take_along_axis(jnp.concatenate(pool_parents, axis=1), kept, axis=1)
  parent_node = 1 + jnp.argmax(kept[:, None, :] == parent_pool[:, :, None], axis=2)
  parents = jnp.where(parent_pool < 0, 0, parent_node)                     # [B, M]
  node_tokens = jnp.concatenate([root_token[:, None], kept_tokens], axis=1)
  parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), parents.astype(jnp.int32)], 1)
  depths = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                            jnp.asarray(spec.pool_depths)[kept]], axis=1)
  if key is None:
    return carry, node_tokens.astype(jnp.int32), parents, depths, ranks
  row = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.take_along_axis(
      jnp.concatenate(expanded_row, axis=1), kept, axis=1)], axis=1)        # [B, N]
  rows = jnp.arange(batch)[:, None]
  draft_logp = jnp.concatenate(expanded_scores, axis=1)[rows, jnp.maximum(row, 0)]
  candidates = jnp.concatenate(expanded_children, axis=1)[rows, jnp.maximum(row, 0)]
  candidates = jnp.where(row[..., None] >= 0, candidates, -1).astype(jnp.int32)
  return carry, node_tokens.astype(jnp.int32), parents, depths, ranks, draft_logp, candidates


def from_ranked(spec, ranked: jax.Array, root_token: jax.Array) -> jax.Array:
  """Fills a static tree (TreeSpec or SparseTree) from ranked candidate lists: node i
  takes ranked[:, depth_i - 1, rank_i], its rank among its siblings (Medusa's
  Cartesian-product candidates, Cai et al. 2024, section 2.1.2).

  ranked: [B, D', R] int, per depth the candidates best first (D' >= depth, R > the
  tree's largest rank); root_token: [B]. Returns node tokens [B, N] int32.
  """
  nodes = ranked[:, spec.depths[1:] - 1, spec.ranks[1:]].astype(jnp.int32)  # [B, N - 1]
  return jnp.concatenate([root_token[:, None].astype(jnp.int32), nodes], axis=1)


def path_chances(ranks: np.ndarray) -> dict:
  """{path of sibling ranks: fraction of positions where that node is accepted}.

  ranks: [M, K] per measured position the rank of the right token in each depth's
  candidate list, -1 where it is missing (launch/tree_tuning.py measures them).
  """
  counts = collections.Counter()
  for row in ranks:
    path = ()
    for r in row:
      if r < 0:
        break
      path += (int(r),)
      counts[path] += 1
  return {path: n / len(ranks) for path, n in counts.items()}


def greedy_order(chances: dict, budget: int) -> list:
  """The first `budget` node paths of Medusa's greedy growth (Cai et al. 2024, section
  2.1.2 / appendix), in the order they are added: highest acceptance chance first, a
  parent before its children (a path's chance never exceeds its parent's, so every
  prefix of the order is the optimal tree of its size), padded with first-level nodes
  when too few paths were seen. Raises ValueError for budget < 1."""
  if budget < 1:
    raise ValueError(f'budget={budget}: a tree needs at least one node.')
  # Shallower first among equal chances, then lower ranks: parents precede children.
  order = sorted(chances, key=lambda p: (-chances[p], len(p), p))
  chosen = []
  for path in order:
    if len(chosen) == budget:
      break
    if len(path) == 1 or path[:-1] in chosen:
      chosen.append(path)
  for rank in range(budget):  # Too few accepted paths seen: pad with first-level nodes.
    if len(chosen) < budget and (rank,) not in chosen:
      chosen.append((rank,))
  return chosen


def grow_tree(chances: dict, budget: int) -> tuple[SparseTree, float]:
  """Medusa's greedy sparse tree: the `budget` nodes (root excluded) of greedy_order.
  -> (tree, expected tau = 1 + the sum of its nodes' chances). Raises ValueError for
  budget < 1."""
  chosen = greedy_order(chances, budget)
  return SparseTree(tuple(chosen)), 1.0 + sum(chances.get(p, 0.0) for p in chosen)