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

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict) -> Params:
    """Parameters (boxed with logical axis names) for a batch of this shape."""

  @abc.abstractmethod
  def loss(self, params: Params, batch: dict, rng: jax.Array, step: jax.Array):
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
  """Sums -> loss (nats/token), perplexity and bits per byte."""
  loss = float(sums['nll_sum']) / max(float(sums['tokens']), 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'bits_per_byte': float(sums['nll_sum']) / max(float(sums['bytes']), 1.0) / math.log(2)}


class LanguageModelObjective(Objective):
  """Next-token cross-entropy of the autoregressive LM over packed documents."""

  def __init__(self, model_config: TransformerConfig):
    self.model = Transformer(model_config)

  def init(self, rng, batch):
    return self.model.init(rng, batch['inputs'], batch['positions'],
                           masks.packed_causal_mask(batch['segment_ids']))['params']

  def loss(self, params, batch, rng, step):
    del rng, step  # Deterministic objective.
    out = self.model.apply({'params': params}, batch['inputs'], batch['positions'],
                           masks.packed_causal_mask(batch['segment_ids']))
    sums = next_token_nll(out.logits, batch)
    return sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0), sums


FAMILIES = {'ar_lm': LanguageModelObjective}


def build(config, vocab_size: int) -> Objective:
  if config.family not in FAMILIES:
    raise ValueError(f'Unknown model family {config.family!r}; known: {sorted(FAMILIES)}.')
  return FAMILIES[config.family](transformer_config(config, vocab_size))
