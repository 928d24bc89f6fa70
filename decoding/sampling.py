"""The one sampling module: logits -> the processed distribution -> tokens.

Plain sampling and every verifier use `log_probs` below, so a speculative method
that accepts against it reproduces exactly what plain sampling would draw, with
the same filters on.

Filters apply in this order (as in Hugging Face's generation): temperature, then
top-k, then top-p (nucleus), then min-p, each on the distribution left by the
previous ones, and padded vocabulary ids (>= vocab_size) are always removed.
Temperature 0 is greedy: the processed distribution is a point mass on the argmax.

Extreme temperatures never produce NaN or inf: a temperature below GREEDY_BELOW (the
smallest normal float32, ~1.18e-38) is greedy, because such a value is a float32
subnormal that XLA flushes to zero on CPU, GPU and TPU (dividing by it would divide by
0), and at any such temperature the distribution is a point mass in every float32 sense
anyway. Every other temperature divides the max-shifted logits, (logits - max) / T,
so each value is <= 0: a tiny T sends the others to -inf (no mass) instead of
overflowing to +inf, and a huge T (up to the largest float32) flattens the
distribution without ever forming inf / inf. Removed ids stay -inf.

Shapes: logits [..., V] (V may be padded past the tokenizer's vocab_size).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf
# Temperatures below the smallest normal float32 are greedy (see the module docstring).
GREEDY_BELOW = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (hashable) sampling settings."""
  temperature: float = 0.0   # 0 (or < GREEDY_BELOW) = greedy; otherwise logits / temperature
  top_k: int = 0             # keep the k most likely tokens; 0 = off
  top_p: float = 1.0         # keep the smallest set with probability >= top_p; 1 = off
  min_p: float = 0.0         # keep tokens with p >= min_p * max p; 0 = off

  def __post_init__(self):
    if not 0 <= self.temperature <= FLOAT32_MAX:
      raise ValueError(f'temperature must be >= 0 and a finite float32 (at most '
                       f'{FLOAT32_MAX:.4g}), got {self.temperature}.')
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f'top_k must be an integer >= 0 (0 = off), got {self.top_k}.')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}.')
    if not 0 <= self.min_p <= 1:
      raise ValueError(f'min_p must be in [0, 1], got {self.min_p}.')

  @property
  def greedy(self) -> bool:
    """Temperature 0, or one below the smallest normal float32 (a point mass anyway)."""
    return self.temperature < GREEDY_BELOW


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """[..., V] -> float32 [..., V] with ids >= vocab_size at -inf (padding rows, ids the
  tokenizer never produces)."""
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids < vocab_size, logits.astype(jnp.float32), NEG_INF)


def _top_k(logits, k):
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def _top_p(logits, p):
  if p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep a token if the mass strictly before it is < p: the smallest set reaching p.
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < p
  threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, NEG_INF)


def _min_p(logits, min_p):
  if min_p <= 0.0:
    return logits
  # p >= min_p * p_max  <=>  logit >= max logit + log(min_p)
  threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)
  return jnp.where(logits >= threshold, logits, NEG_INF)


def processed_logits(logits: jax.Array, config: SamplingConfig, vocab_size: int) -> jax.Array:
  """[..., V] -> [..., V] float32 logits of the processed distribution (-inf = removed).

  For greedy decoding this is a point mass: 0 at the argmax, -inf elsewhere.
  """
  logits = mask_padded_vocab(logits, vocab_size)
  if config.greedy:
    best = jnp.argmax(logits, axis=-1)
    return jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], 0.0, NEG_INF)
  # Max-shifted, so nothing overflows to +inf or forms inf / inf (module docstring).
  top = jnp.max(logits, axis=-1, keepdims=True)
  logits = jnp.where(logits > NEG_INF, (logits - top) / jnp.float32(config.temperature), NEG_INF)
  return _min_p(_top_p(_top_k(logits, config.top_k), config.top_p), config.min_p)


def log_probs(logits: jax.Array, config: SamplingConfig, vocab_size: int) -> jax.Array:
  """[..., V] log-probabilities of the processed distribution (what sampling draws from)."""
  return jax.nn.log_softmax(processed_logits(logits, config, vocab_size), axis=-1)


def greedy_ids(logits: jax.Array, vocab_size: int) -> jax.Array:
  """[..., V] logits -> [...] int32 argmax over the real vocabulary: the greedy token,
  where the point mass of `processed_logits` sits (the first of tied maxima)."""
  return jnp.argmax(mask_padded_vocab(logits, vocab_size), axis=-1).astype(jnp.int32)


def sample(rng: jax.Array, logits: jax.Array, config: SamplingConfig,
           vocab_size: int) -> jax.Array:
  """Draws one token per row of [..., V] logits -> [...] int32."""
  if config.greedy:
    return greedy_ids(logits, vocab_size)
  return jax.random.categorical(rng, processed_logits(logits, config, vocab_size),
                                axis=-1).astype(jnp.int32)


def sample_without_replacement(rng: jax.Array, logp: jax.Array, k: int) -> jax.Array:
  """k distinct tokens drawn in order without replacement from the distribution logp
  [..., V] (log-probabilities): the Gumbel-top-k trick (Kool et al. 2019, "Stochastic
  Beams and Where to Find Them", section 3): the k largest of logp + Gumbel noise, in
  decreasing order, are distributed as k successive draws, each from the distribution
  left after removing the previous ones. Ids of zero probability come last (only when
  fewer than k have mass). Returns [..., k] int32."""
  gumbel = jax.random.gumbel(rng, logp.shape, jnp.float32)
  return jax.lax.top_k(logp + gumbel, k)[1].astype(jnp.int32)
