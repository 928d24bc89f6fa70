"""Multi-token prediction: n heads on a shared trunk, head i predicting token t + i."""
import jax
import jax.numpy as jnp

from models import TransformerConfig, families, masks
from training.objectives.ar_lm import LanguageModelObjective
from training.objectives.base import shifted_targets


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
    targets, valid = shifted_targets(batch, head - 1)  # head i at t: targets[t + i - 1]
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


def build(config, vocab_size: int) -> MultiTokenObjective:
  return MultiTokenObjective(families.transformer_config(config, vocab_size))
