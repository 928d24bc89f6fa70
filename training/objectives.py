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
import optax

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

  def example_batch(self) -> dict:
    """A [1, 1] batch: enough for init to know every parameter's shape."""
    z = jnp.zeros((1, 1), jnp.int32)
    return {'inputs': z, 'positions': z, 'segment_ids': jnp.ones((1, 1), jnp.int32)}


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
  for key in sorted(sums):  # Per-head metrics of draft heads: averages per target token.
    if key.startswith('head') and key.endswith('_sum'):
      out[key[:-len('_sum')]] = float(sums[key]) / max(float(sums['head_tokens']), 1.0)
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


class MultiTokenObjective(LanguageModelObjective):
  """Multi-token prediction (Gloeckle et al. 2024): head i at position t is trained with
  cross-entropy on token t + i (inside the same document); the loss is the sum over the
  n heads of each head's mean over the next-token loss mask.

  Gradients come from the paper's memory-efficient order (`loss_and_grad`): the trunk
  runs forward once; then, one head at a time, that head's forward and backward give
  its parameter gradients and its gradient w.r.t. the trunk's output, which are summed;
  the trunk's backward runs once at the end. The heads run as iterations of a
  `lax.fori_loop` (a `lax.switch` picks the head), so XLA reuses one head's buffers for
  the next: peak memory is that of one head's [B, T, V] logits, not n (an unrolled
  Python loop let XLA keep them all). The gradient equals the plain gradient of the
  summed loss; tests/test_mtp.py checks both.
  Metrics: the next-token nll (head 1) as for any LM, head{i}_nll and head{i}_top1.
  """

  def __init__(self, model_config: TransformerConfig):
    if model_config.mtp_heads < 2:
      raise ValueError(f'Multi-token prediction needs model.mtp_heads >= 2; got '
                       f'{model_config.mtp_heads}.')
    super().__init__(model_config)
    self.num_heads = model_config.mtp_heads

  def _trunk(self, params, batch):
    return self.model.apply({'params': params}, batch['inputs'], batch['positions'],
                            masks.packed_causal_mask(batch['segment_ids']),
                            method=self.model.trunk)

  def _head_loss(self, params, trunk, batch, head: int):
    """Head `head` on the trunk's output -> (its mean nll, (nll_sum, top1_sum))."""
    logits = self.model.apply({'params': params}, head, trunk, batch['positions'],
                              masks.packed_causal_mask(batch['segment_ids']),
                              method=self.model.head_logits)
    shift = lambda x: jnp.pad(x[:, head - 1:], ((0, 0), (0, head - 1)))
    targets = shift(batch['targets'])   # head i at t predicts targets[t + i - 1]
    valid = ((shift(batch['loss_mask']) > 0) & (batch['loss_mask'] > 0)
             & (shift(batch['segment_ids']) == batch['segment_ids']))
    valid &= jnp.arange(valid.shape[1])[None] < valid.shape[1] - (head - 1)
    valid = valid.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)   # over the padded vocabulary, as the LM
    nll_sum = -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * valid)
    top1_sum = jnp.sum((jnp.argmax(logp, -1) == targets) * valid)
    tokens = jnp.sum(batch['loss_mask'].astype(jnp.float32))
    return nll_sum / jnp.maximum(tokens, 1.0), (nll_sum, top1_sum)

  def _sums(self, batch, nll_sums, top1_sums) -> dict:
    """Metric sums from per-head [n] arrays: head 1 as the LM's, the others per head."""
    mask = batch['loss_mask'].astype(jnp.float32)
    sums = {'nll_sum': nll_sums[0], 'tokens': jnp.sum(mask), 'head_tokens': jnp.sum(mask),
            'bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32)}
    for head in range(2, self.num_heads + 1):
      sums[f'head{head}_nll_sum'] = nll_sums[head - 1]
      sums[f'head{head}_top1_sum'] = top1_sums[head - 1]
    return sums

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step, frozen
    trunk = self._trunk(params, batch)
    losses, metrics = zip(*(self._head_loss(params, trunk, batch, head)
                            for head in range(1, self.num_heads + 1)))
    nll_sums, top1_sums = (jnp.stack(m) for m in zip(*metrics))
    return sum(losses), self._sums(batch, nll_sums, top1_sums)

  def loss_and_grad(self, params, batch, rng, step, frozen=None):
    del rng, step, frozen
    trunk, trunk_vjp = jax.vjp(lambda p: self._trunk(p, batch), params)

    def one_head(head):  # -> (loss, metrics, parameter grads, trunk-output grads)
      def run(_):
        (loss, metrics), (param_grads, trunk_grads) = jax.value_and_grad(
            self._head_loss, argnums=(0, 1), has_aux=True)(params, trunk, batch, head)
        return loss, metrics, param_grads, trunk_grads
      return run

    branches = [one_head(head) for head in range(1, self.num_heads + 1)]

    def body(i, carry):
      total, nll_sums, top1_sums, grads, trunk_grads = carry
      loss, (nll_sum, top1_sum), head_grads, head_trunk_grads = jax.lax.switch(i, branches, None)
      return (total + loss, nll_sums.at[i].set(nll_sum), top1_sums.at[i].set(top1_sum),
              jax.tree.map(jnp.add, grads, head_grads), trunk_grads + head_trunk_grads)

    zeros = jnp.zeros((self.num_heads,), jnp.float32)
    total, nll_sums, top1_sums, grads, trunk_grads = jax.lax.fori_loop(
        0, self.num_heads, body, (jnp.zeros((), jnp.float32), zeros, zeros,
                                  jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(trunk)))
    grads = jax.tree.map(jnp.add, grads, trunk_vjp(trunk_grads)[0])
    return (total, self._sums(batch, nll_sums, top1_sums)), grads


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


class MedusaObjective(Objective):
  """Medusa heads on a target LM (Cai et al. 2024).

  Head k (1-based) at position t is trained with cross-entropy on token t + k + 1
  (inside the same document), weighted 0.8^k as in the paper. Medusa-1 (joint=False):
  the target is frozen (passed as `frozen`) and only the heads train; parameters are
  {'heads'}. Medusa-2 (joint=True): parameters are {'base', 'heads'}, the base starts
  from the target and trains too, with its next-token loss kept in the objective so
  its own predictions stay good. Either way each head's LM projection starts from the
  target's LM head.
  """
  HEAD_DECAY = 0.8

  def __init__(self, model_config: TransformerConfig, num_heads: int, target, target_params,
               joint: bool = False):
    from models import MedusaHeads
    if target.config != model_config:
      raise ValueError('Medusa heads read the target\'s hidden states: config.model must be the '
                       'target\'s model (configs/medusa.py copies it from target_workdir).')
    self.base = target
    self.model = MedusaHeads(model_config, num_heads)
    self.num_heads, self.joint = num_heads, joint
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    hidden = jnp.zeros(batch['inputs'].shape + (self.base.config.d_model,), jnp.float32)
    params = {'heads': self.model.init(rng, hidden)['params']}  # boxed: logical axes
    if self.joint:
      params['base'] = self.base.init(rng, batch['inputs'], batch['positions'])['params']
    return params

  def warm_start(self, params, frozen):
    from models.heads import lm_head_matrix
    import flax
    params = flax.core.unfreeze(params)
    head = lm_head_matrix(frozen, self.base.config)
    params['heads']['lm_head'] = jnp.broadcast_to(
        head, params['heads']['lm_head'].shape).astype(params['heads']['lm_head'].dtype)
    if self.joint:
      params['base'] = jax.tree.map(lambda t, p: t.astype(p.dtype), frozen, params['base'])
    return params

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step
    base_params = params['base'] if self.joint else frozen
    out = self.base.apply({'params': base_params}, batch['inputs'], batch['positions'],
                          masks.packed_causal_mask(batch['segment_ids']))
    hidden = out.hidden if self.joint else jax.lax.stop_gradient(out.hidden)
    head_logits = self.model.apply({'params': params['heads']}, hidden)     # [B, T, K, V]
    sums = next_token_nll(out.logits, batch)
    vocab = self.base.config.vocab_size
    length = batch['targets'].shape[1]
    heads_loss = 0.0
    mask0 = batch['loss_mask'].astype(jnp.float32)
    sums['head_tokens'] = jnp.sum(mask0)
    for k in range(1, self.num_heads + 1):
      # Head k at t predicts targets[t + k] (= token t + k + 1), in the same document.
      shift = lambda x: jnp.pad(x[:, k:], ((0, 0), (0, k)))
      targets = shift(batch['targets'])
      valid = (shift(batch['loss_mask']) > 0) & (shift(batch['segment_ids'])
                                                  == batch['segment_ids']) & (mask0 > 0)
      valid &= jnp.arange(length)[None] < length - k
      logp = jax.nn.log_softmax(head_logits[:, :, k - 1, :vocab], axis=-1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      valid = valid.astype(jnp.float32)
      sums[f'head{k}_nll_sum'] = jnp.sum(nll * valid)
      sums[f'head{k}_top1_sum'] = jnp.sum((jnp.argmax(logp, -1) == targets) * valid)
      heads_loss += self.HEAD_DECAY ** k * sums[f'head{k}_nll_sum']
    total = heads_loss + (sums['nll_sum'] if self.joint else 0.0)
    return total / jnp.maximum(sums['tokens'], 1.0), sums


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
    from models import EagleDrafter
    if target.config != model_config:
      raise ValueError('The EAGLE drafter reads the target\'s features: config.model must be '
                       'the target\'s model (configs/eagle.py copies it from target_workdir).')
    self.base = target
    self.model = EagleDrafter(model_config)
    self.cls_weight, self.feature_noise = cls_weight, feature_noise
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    z = jnp.zeros(batch['inputs'].shape + (self.base.config.d_model,), jnp.float32)
    return self.model.init(rng, z, z, batch['positions'])['params']

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
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))
    valid = ((shift(batch['loss_mask']) > 0) & (batch['loss_mask'] > 0)
             & (shift(batch['segment_ids']) == batch['segment_ids']))
    valid &= jnp.arange(valid.shape[1])[None] < valid.shape[1] - 1
    valid = valid.astype(jnp.float32)
    vocab = self.base.config.vocab_size
    # Smooth L1 = Huber with delta 1.
    feature_loss = jnp.mean(optax.huber_loss(predicted.astype(jnp.float32), shift(features)), -1)
    target_logp = jax.lax.stop_gradient(jax.nn.log_softmax(shift(out.logits)[..., :vocab], -1))
    draft_logp = jax.nn.log_softmax(logits[..., :vocab], axis=-1)
    cross_entropy = -jnp.sum(jnp.exp(target_logp) * draft_logp, axis=-1)      # [B, T]
    data_nll = -jnp.take_along_axis(draft_logp, shift(batch['targets'])[..., None], -1)[..., 0]
    agree = jnp.argmax(draft_logp, -1) == jnp.argmax(target_logp, -1)
    sums = dict(next_token_nll(out.logits, batch), head_tokens=jnp.sum(valid),
                head1_nll_sum=jnp.sum(data_nll * valid),
                head1_agree_sum=jnp.sum(agree * valid),
                head1_feature_sum=jnp.sum(feature_loss * valid))
    total = jnp.sum((feature_loss + self.cls_weight * cross_entropy) * valid)
    return total / jnp.maximum(sums['head_tokens'], 1.0), sums


FAMILIES = ('ar_lm', 'distill', 'medusa', 'eagle', 'mtp')
HEADS_FAMILIES = ('medusa', 'eagle')  # trained on a frozen target_workdir, whose model
                                      # and tokenizer they take


def build(config, vocab_size: int) -> Objective:
  """The objective of `config.family`; `distill` restores its frozen target from
  `config.target_workdir`."""
  model_config = transformer_config(config, vocab_size)
  if config.family == 'ar_lm':
    return LanguageModelObjective(model_config)
  if config.family == 'mtp':
    return MultiTokenObjective(model_config)
  if config.family == 'distill':
    from training import checkpoints  # checkpoints builds objectives too: import late
    target_workdir = config.get('target_workdir', '')
    if not target_workdir:
      raise ValueError('Distillation needs config.target_workdir (the trained target).')
    target = checkpoints.restore_model(target_workdir)
    return DistillationObjective(model_config, target.model, target.params)
  if config.family == 'medusa':
    from training import checkpoints
    if not config.get('target_workdir', ''):
      raise ValueError('Medusa heads need config.target_workdir (the trained target).')
    target = checkpoints.restore_model(config.target_workdir)
    return MedusaObjective(model_config, config.medusa.num_heads, target.model, target.params,
                           joint=config.medusa.joint)
  if config.family == 'eagle':
    from training import checkpoints
    if not config.get('target_workdir', ''):
      raise ValueError('The EAGLE drafter needs config.target_workdir (the trained target).')
    target = checkpoints.restore_model(config.target_workdir)
    return EagleObjective(model_config, target.model, target.params,
                          cls_weight=config.eagle.cls_weight,
                          feature_noise=config.eagle.feature_noise)
  raise ValueError(f'Unknown model family {config.family!r}; known: {", ".join(FAMILIES)}.')
