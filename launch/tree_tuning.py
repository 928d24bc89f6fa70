"""Static draft trees for Medusa heads and MTP heads, tuned on the validation split.

Medusa (Cai et al. 2024, sec. 2.1.2 / appendix) builds its sparse tree from a
calibration set: measure how often head k's rank-r token is the one decoding will
accept (acc[k, r]); take a node's chance of acceptance to be the product of acc along
its path (heads treated as independent), so the expected tokens per round is
1 + the sum of that product over the tree's nodes; and grow the tree greedily, adding
the candidate node of highest chance. Because every acc <= 1, a child never beats
its parent, so greedy growth is optimal for each size under that model.

"Accepted" here is greedy acceptance: head k at position t (drafting depth k, token
t + k + 1) is right when its token equals the target's argmax at position t + k,
teacher-forced on validation text.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from decoding import trees
from models import masks

TUNED_TREE_FILE = 'heads_tree.txt'   # in the heads' workdir (MTP: the model's)


@dataclasses.dataclass
class TunedTree:
  tree: trees.SparseTree
  expected_tau: float        # 1 + sum over nodes of the product of accuracies on the path
  accuracy: np.ndarray       # [K, R] acc[k, r]: head k + 1's rank-r token accepted
  positions: int             # validation positions measured


def head_accuracy(target, heads, num_batches: int = 4, max_rank: int = 8,
                  batch_size: int = 8, seq_len: int = 256) -> tuple[np.ndarray, int]:
  """acc [K, R] of each draft head's rank-r token against the target's greedy token.

  target: checkpoints.RestoredModel of the target (or of an MTP model, heads=None);
  heads: RestoredModel of Medusa heads, or None for the MTP model's own heads.
  """
  from training import data
  model, params = target.model, target.params
  sources = data.load_sources(target.config.data)
  vocab = model.config.vocab_size

  @jax.jit
  def counts(batch):
    out = model.apply({'params': params}, batch['inputs'], batch['positions'],
                      masks.packed_causal_mask(batch['segment_ids']))
    if heads is None:
      head_logits = out.future_logits                                       # [B, T, K, V]
    else:
      head_logits = heads.model.apply({'params': heads.params['heads']}, out.hidden)
    greedy = jnp.argmax(out.logits[..., :vocab], axis=-1)                   # [B, T]
    top = jax.lax.top_k(head_logits[..., :vocab], max_rank)[1]              # [B, T, K, R]
    length, num_heads = greedy.shape[1], head_logits.shape[2]
    hits, valid = [], []
    for k in range(1, num_heads + 1):  # head k at t drafts the target's greedy at t + k
      shift = lambda x: jnp.pad(x[:, k:], ((0, 0), (0, k)))
      ok = ((shift(batch['segment_ids']) == batch['segment_ids']) & (batch['segment_ids'] > 0)
            & (jnp.arange(length)[None] < length - k))
      hits.append(jnp.sum((top[:, :, k - 1] == shift(greedy)[..., None]) & ok[..., None], (0, 1)))
      valid.append(jnp.sum(ok))
    return jnp.stack(hits), jnp.stack(valid)

  hits, valid = 0, 0
  for batch in data.eval_batches(sources['validation'], target.tokenizer, batch_size=batch_size,
                                 seq_len=seq_len, num_batches=num_batches):
    h, v = counts({k: jnp.asarray(x) for k, x in batch.items()})
    hits, valid = hits + np.asarray(h), valid + np.asarray(v)
  if np.min(valid) == 0:
    raise ValueError('The validation split gave no positions to measure the heads on.')
  return hits / valid[:, None], int(valid[0])


def grow_tree(accuracy: np.ndarray, budget: int) -> tuple[trees.SparseTree, float]:
  """Greedy tree of `budget` nodes (root excluded) maximising the expected accepted
  length under acc[depth - 1, rank] independence; -> (tree, expected tau)."""
  num_heads, max_rank = accuracy.shape
  if budget < 1:
    raise ValueError(f'budget={budget}: a tree needs at least one node.')
  chosen, score = {}, {(): 1.0}
  frontier = {(r,): accuracy[0, r] for r in range(max_rank)}
  while len(chosen) < budget and frontier:
    path = max(frontier, key=lambda p: (frontier[p], -len(p), tuple(-r for r in p)))
    chosen[path] = score[path] = frontier.pop(path)
    if len(path) < num_heads:
      frontier.update({path + (r,): score[path] * accuracy[len(path), r]
                       for r in range(max_rank)})
  return trees.SparseTree(tuple(chosen)), 1.0 + float(sum(chosen.values()))


def tune(target, heads, budget: int = 24, num_batches: int = 4) -> TunedTree:
  accuracy, positions = head_accuracy(target, heads, num_batches)
  tree, tau = grow_tree(accuracy, budget)
  return TunedTree(tree, tau, accuracy, positions)


def tuned_tree_path(workdir: str) -> str:
  return os.path.join(workdir, TUNED_TREE_FILE)


def load_tuned_tree(workdir: str) -> str | None:
  """The tree spec string saved by launch.tune_tree in `workdir`, or None."""
  path = tuned_tree_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip()
