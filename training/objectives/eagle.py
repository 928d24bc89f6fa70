"""The EAGLE drafter on a frozen target: feature regression plus the target's distribution."""
import jax
import jax.numpy as jnp
import optax

from models import EagleDrafter, TransformerConfig, families, masks
from training.objectives.base import (Objective, next_token_nll, restore_target, shift_left,
                                      shifted_targets)


class EagleObjective(Objective):
  """The EAGLE drafter on a frozen target (Li et al. 2024).

  The target reads the batch once (frozen, passed as `frozen`), giving its features
  f_t [B, T, D] and distributions p_{t+1}. The drafter reads (f_t + noise, e(x_{t+1}))
  and predicts f^_{t+1}; the loss is EAGLE's
      SmoothL1(f^_{t+1}, f_{t+1})  +  w_cls * CE(p_{t+2}, softmax(LM_head(f^_{t+1}))),
  the classification term against the target's own distribution (the drafter is to
  predict what the target would say, not the data). Uniform feature noise
  U(-a, a) during training makes the drafter robust to its own errors when it reads
  its predictions while drafting (the paper's data augmentation, a = 0.1).
  Metrics per target token: head1_nll (NLL of the data token x_{t+2}), head1_agree
  (the drafter's top token equals the target's: greedy acceptance of a first draft),
  head1_feature (the regression loss).
  """

  def __init__(self, model_config: TransformerConfig, target, target_params,
               cls_weight: float = 0.1, feature_noise: float = 0.1):
    if target.config != model_config:
      raise ValueError('The EAGLE drafter reads the target\'s features: config.model must be '
                       'the target\'s model (configs/eagle.py copies it from target_workdir).')
    self.base = target
    self.model = EagleDrafter(model_config)
    self.cls_weight, self.feature_noise = cls_weight, feature_noise
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    return families.init_params(self.model, rng, batch)

  def loss(self, params, batch, rng, step, frozen=None):
    del step
    mask = masks.packed_causal_mask(batch['segment_ids'])
    out = self.base.apply({'params': frozen}, batch['inputs'], batch['positions'], mask)
    features = jax.lax.stop_gradient(out.hidden.astype(jnp.float32))           # [B, T, D]
    embedded = jax.lax.stop_gradient(self.base.apply(
        {'params': frozen}, batch['targets'], method=self.base.embed))        # e(x_{t+1})
    noisy = features + jax.random.uniform(rng, features.shape, minval=-self.feature_noise,
                                          maxval=self.feature_noise)
    predicted, _ = self.model.apply({'params': params}, noisy, embedded, batch['positions'],
                                    mask)                                     # f^_{t+1}
    logits = self.base.apply({'params': frozen}, predicted, method=self.base.logits)
    # Position t is compared with t + 1 of the same document.
    targets, valid = shifted_targets(batch, 1)                                # x_{t+2}
    valid = valid.astype(jnp.float32)
    vocab = self.base.config.vocab_size
    # Smooth L1 = Huber with delta 1.
    feature_loss = jnp.mean(optax.huber_loss(predicted.astype(jnp.float32),
                                             shift_left(features, 1)), -1)
    target_logp = jax.lax.stop_gradient(
        jax.nn.log_softmax(shift_left(out.logits, 1)[..., :vocab], -1))
    draft_logp = jax.nn.log_softmax(logits[..., :vocab], axis=-1)
    cross_entropy = -jnp.sum(jnp.exp(target_logp) * draft_logp, axis=-1)      # [B, T]
    data_nll = -jnp.take_along_axis(draft_logp, targets[..., None], -1)[..., 0]
    agree = jnp.argmax(draft_logp, -1) == jnp.argmax(target_logp, -1)
    sums = dict(next_token_nll(out.logits, batch), head_tokens=jnp.sum(valid),
                head1_nll_sum=jnp.sum(data_nll * valid),
                head1_agree_sum=jnp.sum(agree * valid),
                head1_feature_sum=jnp.sum(feature_loss * valid))
    total = jnp.sum((feature_loss + self.cls_weight * cross_entropy) * valid)
    return total / jnp.maximum(sums['head_tokens'], 1.0), sums


def build(config, vocab_size: int) -> EagleObjective:
  """The drafter of `config.eagle` on the target restored from `config.target_workdir`."""
  model_config = families.transformer_config(config, vocab_size)
  target = restore_target(config, 'The EAGLE drafter needs')
  return EagleObjective(model_config, target.model, target.params,
                        cls_weight=config.eagle.cls_weight,
                        feature_noise=config.eagle.feature_noise)
