"""A draft LM distilled toward a frozen target (DistillSpec, on-corpus)."""
import jax
import jax.numpy as jnp

from models import TransformerConfig, families, masks
from training.objectives.ar_lm import LanguageModelObjective
from training.objectives.base import next_token_nll, restore_target


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


def build(config, vocab_size: int) -> DistillationObjective:
  """The draft of `config.model`, its teacher restored from `config.target_workdir`."""
  model_config = families.transformer_config(config, vocab_size)
  target = restore_target(config, 'Distillation needs')
  return DistillationObjective(model_config, target.model, target.params)
