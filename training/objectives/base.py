"""What every objective shares: the `Objective` interface, the next-token NLL, the
metric summary, the "target k tokens ahead in the same document" helper, and the
frozen target of the families trained on one."""
import abc
import math
from typing import Any

import jax
import jax.numpy as jnp

from models import families
from training import checkpoints

Params = Any


class Objective(abc.ABC):
  # Parameters of a frozen model the loss reads (e.g. a distillation teacher) and that
  # model, for their logical shardings. The trainer passes them to the jitted step as an
  # argument, so they are never baked into the program as constants.
  frozen_model: Any = None
  frozen_params: Any = None

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict) -> Params:
    """Parameters (boxed with logical axis names) for a batch of this shape."""

  @abc.abstractmethod
  def loss(self, params: Params, batch: dict, rng: jax.Array, step: jax.Array, frozen=None):
    """-> (scalar loss to minimise, metrics: dict of scalar sums)."""

  def loss_and_grad(self, params: Params, batch: dict, rng: jax.Array, step: jax.Array,
                    frozen=None):
    """-> ((loss, metrics), gradients w.r.t. params): what the train step calls. A family
    may compute its gradients another way (e.g. MTP's sequential head backward)."""
    return jax.value_and_grad(self.loss, has_aux=True)(params, batch, rng, step, frozen)

  def trainable(self, params: Params) -> Any:
    """A tree of bools shaped like `params`: which leaves the optimizer updates."""
    return jax.tree.map(lambda _: True, params)

  def warm_start(self, params: Params, frozen) -> Params:
    """A fresh run's parameters after init (e.g. heads copying the target's LM head)."""
    del frozen
    return params

  def eval_sums(self, params: Params, batch: dict, rng: jax.Array, step: jax.Array,
                frozen=None) -> dict:
    """Metric sums of an eval batch (the validation split's packed text). Default: the
    training loss's metrics; an objective trained on other data (e.g. consistency
    training on Jacobi trajectories) gives the LM's next-token sums here."""
    return self.loss(params, batch, rng, step, frozen)[1]

  def train_dataset(self, batch_size: int, seed: int, process_index: int,
                    process_count: int):
    """The training batches (a grain IterDataset of [batch_size, ...] dicts), or None for
    the packed text corpus of config.data (every family but consistency training)."""
    del batch_size, seed, process_index, process_count
    return None

  def example_batch(self) -> dict:
    """A [1, 1] batch: enough for init to know every parameter's shape."""
    return families.example_batch()


def next_token_nll(logits: jax.Array, batch: dict) -> dict:
  """Summed next-token negative log-likelihood over the batch's loss mask.

  logits: [B, T, V] float32; batch: targets, loss_mask, target_bytes [B, T].
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]   # [B, T]
  mask = batch['loss_mask'].astype(jnp.float32)
  return {'nll_sum': jnp.sum(nll * mask), 'tokens': jnp.sum(mask),
          'bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32)}


def shift_left(x: jax.Array, k: int) -> jax.Array:
  """x [B, T, ...] -> [B, T, ...] holding x[:, t + k] at t, zeros in the last k positions."""
  return jnp.pad(x[:, k:], ((0, 0), (0, k)) + ((0, 0),) * (x.ndim - 2))


def shifted_targets(batch: dict, k: int) -> tuple[jax.Array, jax.Array]:
  """The target k tokens ahead within the same packed document.

  batch: targets, loss_mask, segment_ids [B, T], where targets[:, t] is the token after
  inputs[:, t]. Returns
    targets [B, T] int: batch['targets'][:, t + k], the token k + 1 after inputs[:, t]
      (0 in the last k positions);
    valid [B, T] bool: both t's and t + k's targets are in the loss mask, t + k is in
      t's document (same segment id) and t + k < T.
  k = 0 gives the next-token targets and the loss mask (as bools).
  """
  targets = shift_left(batch['targets'], k)
  valid = ((shift_left(batch['loss_mask'], k) > 0) & (batch['loss_mask'] > 0)
           & (shift_left(batch['segment_ids'], k) == batch['segment_ids']))
  valid &= jnp.arange(valid.shape[1])[None] < valid.shape[1] - k
  return targets, valid


def summarize(sums: dict) -> dict:
  """Sums -> loss (nats/token), perplexity and bits per byte (+ KL if distilling)."""
  tokens = max(float(sums['tokens']), 1.0)
  loss = float(sums['nll_sum']) / tokens
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
         'bits_per_byte': float(sums['nll_sum']) / max(float(sums['bytes']), 1.0) / math.log(2)}
  if 'kl_sum' in sums:
    out['kl_to_target'] = float(sums['kl_sum']) / tokens
  for key in sorted(sums):  # Per-head metrics of draft heads and early exits: averages
    if key.startswith(('head', 'exit')) and key.endswith('_sum'):   # per target token.
      out[key[:-len('_sum')]] = float(sums[key]) / max(float(sums['head_tokens']), 1.0)
  return out


def restore_target(config, needs: str) -> checkpoints.RestoredModel:
  """The trained target of a family trained on one (config.target_workdir).

  needs: the start of the error when it is missing, e.g. 'Medusa heads need'.
  """
  target_workdir = config.get('target_workdir', '')
  if not target_workdir:
    raise ValueError(f'{needs} config.target_workdir (the trained target).')
  return checkpoints.restore_model(target_workdir)
