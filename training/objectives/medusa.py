"""Medusa heads on a target LM: Medusa-1 (frozen target) and Medusa-2 (joint)."""
import flax
import jax
import jax.numpy as jnp

from models import MedusaHeads, TransformerConfig, families, masks
from models.heads import lm_head_matrix
from training.objectives.base import Objective, next_token_nll, restore_target, shifted_targets


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
    if target.config != model_config:
      raise ValueError('Medusa heads read the target\'s hidden states: config.model must be the '
                       'target\'s model (configs/medusa.py copies it from target_workdir).')
    self.base = target
    self.model = MedusaHeads(model_config, num_heads)
    self.num_heads, self.joint = num_heads, joint
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    return families.init_params(self.model, rng, batch, self.base if self.joint else None)

  def warm_start(self, params, frozen):
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
    heads_loss = 0.0
    mask0 = batch['loss_mask'].astype(jnp.float32)
    sums['head_tokens'] = jnp.sum(mask0)
    for k in range(1, self.num_heads + 1):
      # Head k at t predicts targets[t + k] (= token t + k + 1), in the same document.
      targets, valid = shifted_targets(batch, k)
      logp = jax.nn.log_softmax(head_logits[:, :, k - 1, :vocab], axis=-1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      valid = valid.astype(jnp.float32)
      sums[f'head{k}_nll_sum'] = jnp.sum(nll * valid)
      sums[f'head{k}_top1_sum'] = jnp.sum((jnp.argmax(logp, -1) == targets) * valid)
      heads_loss += self.HEAD_DECAY ** k * sums[f'head{k}_nll_sum']
    total = heads_loss + (sums['nll_sum'] if self.joint else 0.0)
    return total / jnp.maximum(sums['tokens'], 1.0), sums


def build(config, vocab_size: int) -> MedusaObjective:
  """Heads of `config.medusa` on the target restored from `config.target_workdir`."""
  model_config = families.transformer_config(config, vocab_size)
  target = restore_target(config, 'Medusa heads need')
  return MedusaObjective(model_config, config.medusa.num_heads, target.model, target.params,
                         joint=config.medusa.joint)
