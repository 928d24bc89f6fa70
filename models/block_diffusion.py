"""Block diffusion LM (BD3-LM; Arriola et al., ICLR 2025, "Block Diffusion: Interpolating
Between Autoregressive and Diffusion Language Models").

The trunk is the one Transformer (models/transformer.py) with a vocabulary extended by one
id, the mask token [MASK] = config.vocab_size - 1 (the tokenizer's vocabulary size). A
sequence is cut into blocks of `block_size` tokens; blocks are generated left to right
and the tokens of one block are denoised together from [MASK] (absorbing-state masked
diffusion inside the block). The denoiser output at a noised position l predicts the clean
token x^l itself (not the next token), from the noised block x_t^b and the clean blocks
x^{<b} (section 3.1).

The denoiser is not conditioned on the diffusion time: masked diffusion models are
time-agnostic (the BD3-LM reference code trains without time conditioning for the same
reason), so sampling can skip calls when a step unmasks nothing and the first-hitting
sampler needs no time at all.

SUBS parameterization (Sahoo et al. 2024, MDLM, section 3.2, used by BD3-LM): the
denoiser never predicts [MASK] (its logit, and those of padded ids, are -inf), and
unmasked tokens are carried over unchanged; `denoiser_logits` applies the first part,
the objective and the samplers the second.
"""
import dataclasses

import jax
import jax.numpy as jnp

from models import masks
from models.transformer import Transformer

NEG_INF = -jnp.inf


class BlockDiffusionLM(Transformer):
  """A Transformer trained as a BD3-LM with blocks of `block_size` tokens.

  config.vocab_size is the tokenizer's vocabulary plus one: the mask token is
  `mask_id` = config.vocab_size - 1. block_size = 1 is an autoregressive model whose
  query for token l is [MASK] at position l (the noised block) over the clean prefix.
  """
  block_size: int = 8

  @property
  def mask_id(self) -> int:
    return self.config.vocab_size - 1

  def denoiser_logits(self, logits: jax.Array) -> jax.Array:
    """[..., V] -> float32 [..., V] with [MASK] and padded ids at -inf (SUBS: zero
    masking probability)."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < self.mask_id, logits.astype(jnp.float32), NEG_INF)

  def training_logits(self, noised: jax.Array, clean: jax.Array, positions: jax.Array,
                      segment_ids: jax.Array) -> jax.Array:
    """The vectorized training forward (BD3-LM section 3.2): one call over x_t (+) x_0
    under masks.bd3lm_training_mask, so every noised block sees the clean blocks before
    it, as sampling's KV cache does, in one pass instead of one per block.

    noised, clean: [B, T] int32 (T a multiple of block_size); positions: [B, T] the
    positions of both halves (each half is the same sequence); segment_ids: [B, T]
    packed document ids (0 = padding). Returns [B, T, V] float32 denoiser logits
    (denoiser_logits applied) of the noised half; the clean half's logits are not
    computed (it only provides keys and values).
    Raises ValueError when T is not a multiple of block_size.
    """
    length = noised.shape[1]
    if length % self.block_size:
      raise ValueError(f'The sequence length {length} is not a multiple of the block size '
                       f'{self.block_size}.')
    tokens = jnp.concatenate([noised, clean], axis=1)
    both = jnp.concatenate([positions, positions], axis=1)
    mask = masks.bd3lm_training_mask(segment_ids, self.block_size)
    x, _, _ = self.blocks(self.embed(tokens), both, mask)
    return self.denoiser_logits(self.head(x[:, :length]))


SCHEDULES = ('loglinear', 'cosine', 'clipped')


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A masking schedule alpha_t (the probability that a token is still clean at time t in
  [0, 1]; alpha_0 = 1, alpha_1 ~ 0) and the ELBO weight of masked diffusion.

  kind:
    loglinear  alpha_t = 1 - (1 - eps) t (MDLM's log-linear schedule, sigma_t =
               -log(1 - (1 - eps) t)); weight 1 / t.
    cosine     1 - alpha_t = sin(pi t / 2) (MaskGIT's cosine mask ratio written in
               diffusion time, as in BD3-LM's schedule study); weight
               (pi / 2) cos(pi t / 2) / sin(pi t / 2).
    clipped    BD3-LM's clipped schedule (section 4): the linear schedule (eps = 0) whose
               mask rate 1 - alpha_t = t is drawn from U[beta, omega] in training only;
               evaluation uses the whole range (the NELBO is the same bound).
  The masked-diffusion NELBO of one block (MDLM eq. 10, BD3-LM eq. 8) is
      E_{t ~ U[0, 1]} [ w(t) sum_{l masked} -log p_theta(x^l | x_t^b, x^{<b}) ],
      w(t) = -alpha'_t / (1 - alpha_t),
  and E_t[w(t) (1 - alpha_t)] = alpha_0 - alpha_1 = 1 - alpha_1, so with one token per
  block the bound is the autoregressive NLL (up to alpha_1).
  """
  kind: str = 'loglinear'
  eps: float = 1e-3          # loglinear: alpha_1 = eps
  beta: float = 0.3          # clipped: training mask rates in [beta, omega]
  omega: float = 0.8
  t_min: float = 1e-3        # the smallest t drawn (the weight diverges at 0; MDLM's
                             # sampling_eps): its part of the bound is about t_min nats

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f'Unknown noise schedule {self.kind!r}; expected one of '
                       f'{", ".join(SCHEDULES)}.')
    if not 0 <= self.beta < self.omega <= 1:
      raise ValueError(f'The clipped schedule needs 0 <= beta < omega <= 1; got '
                       f'[{self.beta}, {self.omega}].')
    if not 0 <= self.eps < 1 or not 0 < self.t_min < 1:
      raise ValueError(f'Schedule eps must be in [0, 1) and t_min in (0, 1); got '
                       f'{self.eps}, {self.t_min}.')

  def alpha(self, t):
    """alpha_t: [...] times in [0, 1] -> [...] probability of staying clean."""
    if self.kind == 'loglinear':
      return 1.0 - (1.0 - self.eps) * t
    if self.kind == 'cosine':
      return 1.0 - jnp.sin(jnp.pi / 2 * t)
    return 1.0 - t

  def weight(self, t):
    """w(t) = -alpha'_t / (1 - alpha_t), the NELBO weight of a masked token at time t > 0."""
    if self.kind == 'cosine':
      return (jnp.pi / 2) * jnp.cos(jnp.pi / 2 * t) / jnp.sin(jnp.pi / 2 * t)
    return 1.0 / t

  def train_range(self) -> tuple[float, float]:
    """The interval t is drawn from in training (the clipped one for 'clipped')."""
    if self.kind == 'clipped':
      return max(self.beta, self.t_min), self.omega
    return self.t_min, 1.0

  def eval_range(self) -> tuple[float, float]:
    """The interval of the NELBO (validation): the whole (0, 1]."""
    return self.t_min, 1.0


class TidarLM(Transformer):
  """TiDAR (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in Autoregression"): one
  trunk that is both an autoregressive LM and a block diffusion drafter. Its vocabulary
  is the tokenizer's plus the mask token `mask_id` = config.vocab_size - 1 (as
  BlockDiffusionLM's). A clean token under the causal mask predicts the next token (the
  model's AR distribution, the one decoding is lossless against); a block of
  `block_size` mask tokens after a clean prefix predicts, at each of its positions, the
  clean token there (masked diffusion in one step). Training: masks.tidar_training_mask;
  decoding: decoding/tidar.py (one call verifies the previous draft and drafts the
  next block, masks.tidar_round_mask).

  Every call's logits put the mask token (and padded ids) at -inf: the model never
  emits [MASK], neither as its next token nor as a draft (SUBS), so plain
  autoregressive decoding of a TidarLM is the distribution TiDAR decoding reproduces.
  """
  block_size: int = 4

  @property
  def mask_id(self) -> int:
    return self.config.vocab_size - 1

  def __call__(self, tokens, positions, attention_mask=None, cache=None,
               return_layer_hidden: bool = False, write_slots=None, layers=None,
               logits_at=None):
    """models.Transformer.__call__ with [MASK] and the padded ids at -inf in the logits."""
    out = super().__call__(tokens, positions, attention_mask, cache, return_layer_hidden,
                           write_slots, layers, logits_at=logits_at)
    ids = jnp.arange(out.logits.shape[-1])
    return out.replace(logits=jnp.where(ids < self.mask_id, out.logits, NEG_INF))
