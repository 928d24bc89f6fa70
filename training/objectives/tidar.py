"""TiDAR (Liu et al. 2025): one model trained with the autoregressive loss and the
block diffusion loss in the same forward."""
import jax
import jax.numpy as jnp

from models import TidarLM, TransformerConfig, families, masks
from training.objectives.base import Objective, next_token_nll
from training.objectives.block_diffusion import scored_tokens


class TidarObjective(Objective):
  """TiDAR's training objective (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in
  Autoregression", section 3.2): the packed row x and a copy of it whose every token is
  [MASK] go through the model once, under masks.tidar_training_mask, and

      L = (ar_weight * L_AR + L_diff) / (1 + ar_weight),

  L_AR the next-token cross entropy of the clean half (causal: the model's AR LM),
  L_diff the cross entropy of each masked position's clean token given the clean prefix
  before its block and the block's other mask tokens. The paper's choice, kept here:
  the diffusion half is fully masked (no sampled noise level), which matches decoding
  exactly (TiDAR drafts a whole block of mask tokens in one step) and gives a loss at
  every position; ar_weight 1 is the paper's default. Both terms are means over their
  scored tokens (next_token_nll's loss mask; block_diffusion.scored_tokens).
  The trainer's nll_sum / tokens / bytes are the AR half's, so eval loss, perplexity and
  bits per byte are the AR LM's, comparable with an ar_lm model's; head1_nll and
  head1_agree are the diffusion drafter's per masked token (agree: its top token is the
  clean one).
  """

  def __init__(self, model_config: TransformerConfig, block_size: int, seq_len: int,
               ar_weight: float = 1.0):
    if block_size < 2:
      raise ValueError(f'tidar.block_size={block_size}; a block holds the next token and '
                       'at least one draft (>= 2).')
    if seq_len % block_size:
      raise ValueError(f'tidar.block_size={block_size} does not divide seq_len={seq_len}.')
    if ar_weight < 0:
      raise ValueError(f'tidar.ar_weight={ar_weight}; expected >= 0.')
    self.model = TidarLM(model_config, block_size=block_size)
    self.block_size, self.ar_weight = block_size, ar_weight

  def init(self, rng, batch):
    del batch
    return families.init_params(self.model, rng, self.example_batch())

  def loss(self, params, batch, rng, step, frozen=None):
    del rng, step, frozen
    clean, length = batch['inputs'], batch['inputs'].shape[1]
    tokens = jnp.concatenate([clean, jnp.full_like(clean, self.model.mask_id)], axis=1)
    positions = jnp.concatenate([batch['positions'], batch['positions']], axis=1)
    mask = masks.tidar_training_mask(batch['segment_ids'], self.block_size)
    logits = self.model.apply({'params': params}, tokens, positions, mask).logits
    sums = next_token_nll(logits[:, :length], batch)                   # the AR half
    logp = jax.nn.log_softmax(logits[:, length:], axis=-1)             # the diffusion half
    nll = -jnp.take_along_axis(logp, clean[..., None], axis=-1)[..., 0]
    scored, _ = scored_tokens(batch)
    scored = scored.astype(jnp.float32)
    sums.update(head_tokens=jnp.sum(scored), head1_nll_sum=jnp.sum(nll * scored),
                head1_agree_sum=jnp.sum((jnp.argmax(logp, -1) == clean) * scored))
    ar = sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0)
    diffusion = sums['head1_nll_sum'] / jnp.maximum(sums['head_tokens'], 1.0)
    return (self.ar_weight * ar + diffusion) / (1.0 + self.ar_weight), sums


def build(config, vocab_size: int) -> TidarObjective:
  """The TiDAR objective of `config.tidar` (block_size, ar_weight); vocab_size is the
  tokenizer's (the model adds the mask token)."""
  trunk = families.build_module(config, vocab_size).config
  return TidarObjective(trunk, config.tidar.block_size, config.seq_len, config.tidar.ar_weight)
