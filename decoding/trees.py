"""Static draft trees: shape, attention masks and position ids.

A tree has N nodes in breadth-first order. Node 0 is the root: the last committed
token, whose logits propose the first level. Every node at depth d has
`branching[d]` children, so each depth's nodes are contiguous and node j's children
are a contiguous range. A chain of K tokens is branching (1,) * K.

In a cache, node i sits in slot root_slot + i and at position root_slot + depth(i);
it attends to the committed prefix (slots < root_slot) and to its ancestors,
itself included (the tree attention mask of SpecInfer / Medusa).
"""
import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  branching: tuple[int, ...]   # children per node at depth 0, 1, ... (D = len)

  def __post_init__(self):
    if not self.branching or min(self.branching) < 1:
      raise ValueError(f'A tree needs >= 1 level and >= 1 child per node; got {self.branching}.')

  @property
  def depth(self) -> int:
    return len(self.branching)

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
    out = np.eye(self.num_nodes, dtype=bool)
    for i in range(1, self.num_nodes):
      out[i] |= out[self.parents[i]]
    return out

  def first_child(self, node: jnp.ndarray, depth: int) -> jnp.ndarray:
    """Index of the first child of `node` (a node at `depth`)."""
    start, nxt = self.level_starts[depth], self.level_starts[depth + 1]
    return nxt + (node - start) * self.branching[depth]


def parse(spec: str) -> TreeSpec:
  """'3,2,1' -> TreeSpec((3, 2, 1))."""
  try:
    return TreeSpec(tuple(int(x) for x in spec.split(',')))
  except ValueError as e:
    raise ValueError(f'Bad tree spec {spec!r}: expected children per level, like "3,2,1".') from e


def tree_mask(spec: TreeSpec, root_slots: jnp.ndarray, nodes: slice, capacity: int) -> jnp.ndarray:
  """[B, T, S] mask for feeding tree nodes `nodes` (T of them) into a cache whose root
  sits at root_slots [B]."""
  ancestors = jnp.asarray(spec.ancestors[nodes])                            # [T, N]
  relative = jnp.arange(capacity)[None] - root_slots[:, None]              # [B, S]
  in_tree = (relative >= 0) & (relative < spec.num_nodes)
  tree_part = jnp.take(ancestors, jnp.clip(relative, 0, spec.num_nodes - 1), axis=1)  # [T, B, S]
  tree_part = jnp.swapaxes(tree_part, 0, 1) & in_tree[:, None]
  return (relative < 0)[:, None, :] | tree_part
