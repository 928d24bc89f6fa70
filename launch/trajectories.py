"""Jacobi trajectories of a trained target, the data of consistency training (CLLM;
Kou et al. 2024): the library behind python -m launch.collect_jacobi."""
import numpy as np


def _source_rows(lengths: np.ndarray, prompt_lengths: np.ndarray, block_size: int,
                 num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompt row, block index) of each record, from the collector's context lengths
  (row b's block k has context length P_b + k * n); ValueError if they fit no order."""
  batch = len(prompt_lengths)
  k = np.arange(num_blocks)
  for rows, blocks in ((np.repeat(np.arange(batch), num_blocks), np.tile(k, batch)),   # b-major
                       (np.tile(np.arange(batch), num_blocks), np.repeat(k, batch))):  # k-major
    if np.array_equal(lengths, prompt_lengths[rows] + blocks * block_size):
      return rows, blocks
  raise ValueError('The collector\'s context lengths fit no record order; expected prompt '
                   'length + k * block_size.')


def collect(restored, prompts: list[list[int]], *, block_size: int, num_blocks: int,
            max_iterations: int = 0, batch_size: int = 16, seed: int = 0,
            init: str = 'context') -> dict:
  """Jacobi trajectories of `restored` (checkpoints.RestoredModel) on token prompts.

  Calls decoding.jacobi.collect_trajectories on batches of `batch_size` prompts (the
  last batch padded with copies of its first prompt, whose records are dropped).
  Returns the fields of training.data.TRAJECTORY_FIELDS over the kept records
  (R <= len(prompts) * num_blocks): context [R, C], context_lengths [R], states
  [R, J, n], fixed_point [R, n], iterations [R], block_mask [R, n].
  Raises ValueError for bad sizes or prompts (before anything compiles).
  """
  import jax
  from decoding import driver, jacobi
  if block_size < 1 or num_blocks < 1 or batch_size < 1:
    raise ValueError(f'block_size, num_blocks and batch_size must be >= 1; got {block_size}, '
                     f'{num_blocks}, {batch_size}.')
  max_iterations = max_iterations or block_size + 1
  if max_iterations < 1:
    raise ValueError(f'max_iterations must be >= 1; got {max_iterations}.')
  if not prompts or any(len(p) < 1 for p in prompts):
    raise ValueError('Every prompt needs at least one token.')
  eos_ids = np.asarray(restored.tokenizer.eos_ids)
  padded, lengths = driver.pad_prompts(prompts)
  rng = jax.random.PRNGKey(seed)
  parts = []
  for start in range(0, len(prompts), batch_size):
    rows = np.arange(start, min(start + batch_size, len(prompts)))
    take = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    out = jacobi.collect_trajectories(
        restored.model, restored.params, padded[take], lengths[take], block_size=block_size,
        num_blocks=num_blocks, max_iterations=max_iterations,
        rng=jax.random.fold_in(rng, start), init=init)
    out = {k: np.asarray(v) for k, v in out.items()}
    row, block = _source_rows(out['context_lengths'], lengths[take], block_size, num_blocks)
    fixed = out['fixed_point']
    eos = np.isin(fixed, eos_ids)
    # Tokens up to and including the first EOS of the fixed point.
    block_mask = (np.cumsum(eos, axis=1) - eos) == 0
    # A block after one whose fixed point held an EOS continues a finished text: drop it.
    ended = np.zeros(len(row), bool)
    first_eos = {}
    for r in np.argsort(block, kind='stable'):
      key = row[r]
      ended[r] = first_eos.get(key, False)
      first_eos[key] = ended[r] or bool(eos[r].any())
    keep = (row < len(rows)) & ~ended
    out['block_mask'] = block_mask.astype(np.int32)
    parts.append({k: v[keep] for k, v in out.items()})
  width = max(p['context'].shape[1] for p in parts)
  for p in parts:  # Batches of shorter prompts have narrower contexts.
    p['context'] = np.pad(p['context'], ((0, 0), (0, width - p['context'].shape[1])))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summary(arrays: dict) -> dict:
  """records; iterations_per_block: mean m, the Jacobi updates a block of n tokens needed
  to reach its fixed point (decoding/jacobi.py: y^m = y*; 0 <= m <= n, n = no better than
  autoregressive decoding); iterations_per_token: m / n; calls_per_token: the target
  calls (m + 1, the last one confirming the fixed point) per token."""
  iterations = arrays['iterations'].astype(np.float64)
  n = arrays['fixed_point'].shape[1]
  return {'records': int(len(iterations)), 'block_size': int(n),
          'iterations_per_block': float(iterations.mean()),
          'iterations_per_token': float(iterations.mean() / n),
          'calls_per_token': float((iterations.mean() + 1) / n)}
