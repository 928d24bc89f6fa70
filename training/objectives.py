"""Objectives: what a model family supplies to the one trainer.

An objective builds its model, initialises its parameters, computes a loss with
metrics from a batch, and says which parameters train (e.g. draft heads on a
frozen target). Metrics are *sums* over the batch (nll_sum, tokens, bytes) so
the trainer can average them over many eval batches exactly.
"""
import abc
import math
from typing import Any

import jax
import jax.numpy as jnp

from models import Transformer, TransformerConfig, masks

Params = Any


def transformer_config(config, vocab_size: int) -> TransformerConfig:
  """The trunk's static config from the `model` block of a training config."""
  return TransformerConfig(vocab_size=vocab_size, **config.model.to_dict())


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

  def trainable(self, params: Params) -> Any:
    """A tree of bools shaped like `params`: which leaves the optimizer updates."""
    return jax.tree.map(lambda _: True, params)


def next_token_nll(logits: jax.Array, batch: dict) -> dict:
  """Summed next-token negative log-likelihood over the batch's loss mask.

  logits: [B, T, V] float32; batch: targets, loss_mask, target_bytes [B, T].
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]   # [B, T]
  mask = batch['loss_mask'].astype(jnp.float32)
  return {'nll_sum': jnp.sum(nll * mask), 'tokens': jnp.sum(mask),
          'bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32)}


def summarize(sums: dict) -> dict:
  """Sums -> loss (nats/token), perplexity and bits per byte (+ KL if distilling)."""
  tokens = max(float(sums['tokens']), 1.0)
  loss = float(sums['nll_sum']) / tokens
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
         'bits_per_byte': float(sums['nll_sum']) / max(float(sums['bytes']), 1.0) / math.log(2)}
  if 'kl_sum' in sums:
    out['kl_to_target'] = float(sums['kl_sum']) / tokens
  return out


class LanguageModelObjective(Objective):
  """Next-token cross-entropy of the autoregressive LM over packed documents."""

  def __init__(self, model_config: TransformerConfig):
    self.model = Transformer(model_config)

  def init(self, rng, batch):
    return self.model.init(rng, batch['inputs'], batch['positions'],
                           masks.packed_causal_mask(batch['segment_ids']))['params']

  def logits(self, params, batch):
    return self.model.apply({'params': params}, batch['inputs'], batch['positions'],
                            masks.packed_causal_mask(batch['segment_ids'])).logits

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step, frozen  # Deterministic, no frozen model.
    sums = next_token_nll(self.logits(params, batch), batch)
    return sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0), sums


class DistillationObjective(LanguageModelObjective):
  """A draft LM trained to match a frozen target's next-token distribution.

  Loss: forward KL(p_target || q_draft) per token, averaged over the loss mask
  (DistillSpec; the on-corpus variant). Forward KL makes the draft cover the
  target's mass, which is what min(p, q) acceptance rewards. Metrics keep the
  draft's own next-token NLL on the data, so eval loss / bits per byte stay
  comparable with plain training; `kl_sum` is reported too.
  """

  def __init__(self, model_config: TransformerConfig, teacher, teacher_params):
    super().__init__(model_config)
    if teacher.config.vocab_size != model_config.vocab_size:
      raise ValueError(f'The draft vocabulary ({model_config.vocab_size}) differs from the '
                       f'target\'s ({teacher.config.vocab_size}): they must share a tokenizer.')
    self.frozen_model, self.frozen_params = teacher, teacher_params

  def loss(self, params, batch, rng, step, frozen=None):
    vocab = self.model.config.vocab_size
    draft_logits = self.logits(params, batch)
    teacher_logits = jax.lax.stop_gradient(self.frozen_model.apply(
        {'params': frozen}, batch['inputs'], batch['positions'],
        masks.packed_causal_mask(batch['segment_ids'])).logits)
    p_log = jax.nn.log_softmax(teacher_logits[..., :vocab], axis=-1)
    q_log = jax.nn.log_softmax(draft_logits[..., :vocab], axis=-1)
    kl = jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)                    # [B, T]
    mask = batch['loss_mask'].astype(jnp.float32)
    sums = dict(next_token_nll(draft_logits, batch), kl_sum=jnp.sum(kl * mask))
    return sums['kl_sum'] / jnp.maximum(sums['tokens'], 1.0), sums


FAMILIES = ('ar_lm', 'distill')


def build(config, vocab_size: int) -> Objective:
  """The objective of `config.family`; `distill` restores its frozen target from
  `config.target_workdir`."""
  model_config = transformer_config(config, vocab_size)
  if config.family == 'ar_lm':
    return LanguageModelObjective(model_config)
  if config.family == 'distill':
    from training import checkpoints  # checkpoints builds objectives too: import late
    target_workdir = config.get('target_workdir', '')
    if not target_workdir:
      raise ValueError('Distillation needs config.target_workdir (the trained target).')
    target = checkpoints.restore_model(target_workdir)
    return DistillationObjective(model_config, target.model, target.params)
  raise ValueError(f'Unknown model family {config.family!r}; known: {", ".join(FAMILIES)}.')
