"""The autoregressive LM: next-token cross-entropy over packed documents."""
import jax.numpy as jnp

from models import Transformer, TransformerConfig, families, masks
from training.objectives.base import Objective, next_token_nll


class LanguageModelObjective(Objective):
  """Next-token cross-entropy of the autoregressive LM over packed documents."""

  def __init__(self, model_config: TransformerConfig):
    self.model = Transformer(model_config)

  def init(self, rng, batch):
    return families.init_params(self.model, rng, batch)

  def logits(self, params, batch):
    return self.model.apply({'params': params}, batch['inputs'], batch['positions'],
                            masks.packed_causal_mask(batch['segment_ids'])).logits

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step, frozen  # Deterministic, no frozen model.
    sums = next_token_nll(self.logits(params, batch), batch)
    return sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0), sums


def build(config, vocab_size: int) -> LanguageModelObjective:
  return LanguageModelObjective(families.transformer_config(config, vocab_size))
