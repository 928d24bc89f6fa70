"""The EAGLE drafter on a frozen target: feature regression plus the target's distribution;
the EAGLE-3 drafter: fused target layers, training-time test, the target's distribution."""
import jax
import jax.numpy as jnp
import optax

from models import EagleDrafter, KVCache, TransformerConfig, families, masks
from models.heads import check_feature_layers, target_features
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


def ttt_unroll(drafter: EagleDrafter, params, features, embedded, positions, segment_ids,
               steps: int) -> list:
  """The drafter unrolled on its own outputs for `steps` steps (training-time test).

  features: [B, T, k * D] the target's fused-layer features at each position t;
  embedded: [B, T + steps - 1, D] the target's embedding of x_{t+1}, x_{t+2}, ... (the
  true next tokens: a continued draft only matters where the previous one was right);
  positions, segment_ids: [B, T]. Step j reads (step j - 1's output at t, or the target
  features for j = 0; e(x_{t+1+j})) at position t + j, as the depth-j node of a draft
  rooted at entry t reads it while decoding, and attends as
  masks.training_time_test_mask says; its keys and values go to cache slots j * T + t.
  Returns `steps` outputs [B, T, D]: step j's predicts x_{t+2+j} through the target's LM
  head.
  """
  batch, length = segment_ids.shape
  cache = KVCache.empty(drafter.layer_config, batch, steps * length)
  outputs, current = [], features
  for j in range(steps):
    slots = j * length + jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = masks.training_time_test_mask(segment_ids, j, steps)
    current, cache = drafter.apply({'params': params}, current, embedded[:, j:j + length],
                                   positions + j, mask, cache, write_slots=slots)
    outputs.append(current)
  return outputs


class Eagle3Objective(Objective):
  """The EAGLE-3 drafter on a frozen target (Li et al. 2025), trained with training-time
  test: the drafter is unrolled `ttt_steps` times on its own outputs (ttt_unroll, one
  drafter call per step under the mask drafting uses), and step j's prediction of
  x_{t+2+j} is matched to the target's own distribution there,

      loss = sum_j decay^j CE(p_target(x_{t+2+j}), softmax(LM_head(out_j))),

  with no feature regression (the paper drops it: the output only has to rank tokens,
  which is what frees the drafter to read fused low/mid/high features). decay = 0.8 and
  7 steps are the paper code's; the steps here default to the drafting depth. Soft labels
  from the target rather than data tokens: the drafter is to say what the target would,
  which is what verification accepts. No feature noise: EAGLE-1's noise stood in for
  the drafter's own errors, which training-time test now feeds it.
  Metrics per target token: head{j+1}_agree (step j's top token equals the target's:
  greedy acceptance of a depth-(j+1) draft given the previous ones right), head1_nll.
  """

  def __init__(self, model_config: TransformerConfig, target, target_params,
               feature_layers, ttt_steps: int = 5, step_decay: float = 0.8):
    if target.config != model_config:
      raise ValueError('The EAGLE-3 drafter reads the target\'s features: config.model must be '
                       'the target\'s model (configs/eagle3.py copies it from target_workdir).')
    if ttt_steps < 1:
      raise ValueError(f'eagle3.ttt_steps={ttt_steps}; training-time test needs >= 1 step.')
    if not 0 < step_decay <= 1:
      raise ValueError(f'eagle3.step_decay={step_decay}; expected in (0, 1].')
    self.base = target
    self.model = EagleDrafter(model_config,
                              check_feature_layers(feature_layers, model_config.num_layers))
    self.steps, self.decay = ttt_steps, step_decay
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    return families.init_params(self.model, rng, batch)

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step
    steps, vocab = self.steps, self.base.config.vocab_size
    mask = masks.packed_causal_mask(batch['segment_ids'])
    out = self.base.apply({'params': frozen}, batch['inputs'], batch['positions'], mask,
                          return_layer_hidden=True)
    features = jax.lax.stop_gradient(
        target_features(self.model, out).astype(jnp.float32))                # [B, T, k * D]
    future = jnp.pad(batch['targets'], ((0, 0), (0, steps - 1)))           # x_{t+1}, ...
    embedded = jax.lax.stop_gradient(self.base.apply({'params': frozen}, future,
                                                     method=self.base.embed))
    outputs = ttt_unroll(self.model, params, features, embedded, batch['positions'],
                         batch['segment_ids'], steps)
    target_logp = jax.lax.stop_gradient(jax.nn.log_softmax(out.logits[..., :vocab], -1))
    _, head_valid = shifted_targets(batch, 1)
    sums = dict(next_token_nll(out.logits, batch),
                head_tokens=jnp.sum(head_valid.astype(jnp.float32)))
    total = 0.0
    for j, predicted in enumerate(outputs):
      logits = self.base.apply({'params': frozen}, predicted, method=self.base.logits)
      draft_logp = jax.nn.log_softmax(logits[..., :vocab], axis=-1)
      teacher = shift_left(target_logp, j + 1)                   # p(x_{t+2+j} | x_{<=t+1+j})
      _, valid = shifted_targets(batch, j + 1)
      valid = valid.astype(jnp.float32)
      cross_entropy = -jnp.sum(jnp.exp(teacher) * draft_logp, axis=-1)        # [B, T]
      total += self.decay ** j * jnp.sum(cross_entropy * valid)
      agree = jnp.argmax(draft_logp, -1) == jnp.argmax(teacher, -1)
      sums[f'head{j + 1}_agree_sum'] = jnp.sum(agree * valid)
      if j == 0:
        targets, _ = shifted_targets(batch, 1)
        data_nll = -jnp.take_along_axis(draft_logp, targets[..., None], -1)[..., 0]
        sums['head1_nll_sum'] = jnp.sum(data_nll * valid)
    return total / jnp.maximum(sums['head_tokens'], 1.0), sums


def build_eagle3(config, vocab_size: int) -> Eagle3Objective:
  """The EAGLE-3 drafter of `config.eagle3` on the target from `config.target_workdir`."""
  model_config = families.transformer_config(config, vocab_size)
  target = restore_target(config, 'The EAGLE-3 drafter needs')
  return Eagle3Objective(model_config, target.model, target.params,
                         config.eagle3.feature_layers, ttt_steps=config.eagle3.ttt_steps,
                         step_decay=config.eagle3.step_decay)
