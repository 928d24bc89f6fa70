"""Rotary position embeddings and the context-extension scalings of current checkpoints,
computed as `transformers` computes them (modeling_rope_utils.py):

  default  inv_freq_i = theta^(-2i / H)
  linear   inv_freq / factor (position interpolation)
  llama3   Llama-3.1's band-wise rule: long wavelengths (> original / low_freq_factor)
           divided by factor, short ones (< original / high_freq_factor) kept, a smooth
           mix in between
  yarn     YaRN: a ramp between interpolated and extrapolated frequencies over the
           dimensions whose rotation count at the original context lies between
           beta_slow and beta_fast, and cos/sin multiplied by an attention factor
           (0.1 ln(factor) + 1 unless given)
  dynamic  dynamic NTK: while a call's largest position + 1 (seq_len) stays within
           the original context the frequencies are the default ones; past it the base
           becomes theta * (factor * seq_len / original - (factor - 1))^(H / (H - 2)).
           As in transformers, seq_len is the maximum over the whole call (batch
           included), so the frequencies depend on which positions share a call: a
           forward over a sequence and plain token-by-token decoding (a prefill, then
           one position per call) reproduce transformers exactly, but a call that
           scores several new positions at once (a speculative chain or tree, a chunked
           prefill) rotates them with the frequencies of its largest position, so
           speculative methods would not be lossless against plain decoding once the
           context passes the original length: decoding.driver.generate refuses them
           for such a model. Keys keep the rotation of the call that wrote
           them, as transformers' cache does. transformers also keeps the largest
           seq_len seen across calls (a later, shorter call that still exceeds the
           original context reuses it); we have no state between calls: each call uses
           its own largest position, which is what one `generate` from a fresh model does.

The static scalings' frequencies are computed once, on the host, in float64 from the
float32 inputs transformers uses, then rounded to float32 (transformers computes them in
float32 torch arithmetic: the two agree to about one float32 rounding).
"""
import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ('default', 'linear', 'dynamic', 'yarn', 'llama3')


def yarn_attention_factor(factor: float, mscale=None, mscale_all_dim=None) -> float:
  """transformers' default YaRN attention factor (applied to cos and sin)."""
  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
  if mscale and mscale_all_dim:
    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
  return get_mscale(factor)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
  """transformers' 1 / theta^(arange(0, dim, 2) / dim), exponents in float32."""
  exponents = (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)).astype(np.float64)
  return 1.0 / (float(theta) ** exponents)                                  # float64 [dim/2]


def static_frequencies(config) -> tuple[np.ndarray, float]:
  """(inv_freq [H/2] float32, attention factor) of a static scaling (not 'dynamic')."""
  kind, dim = config.rope_type, config.head_dim
  inv_freq = _default_inv_freq(config.rope_theta, dim)
  factor = float(config.rope_factor)
  attention_factor = 1.0
  if kind == 'linear':
    inv_freq = inv_freq.astype(np.float32).astype(np.float64) / factor
  elif kind == 'llama3':
    inv_freq = inv_freq.astype(np.float32).astype(np.float64)
    original = config.rope_original_max
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  elif kind == 'yarn':
    base, original = float(config.rope_theta), config.rope_original_max
    pos_freqs = 1.0 / inv_freq                                            # base^(2i / H)

    def correction_dim(rotations):
      return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001  # transformers: prevents a division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attention_factor = config.rope_attention_factor or yarn_attention_factor(factor)
  elif kind != 'default':
    raise ValueError(f'Unknown rope_type {kind!r}; expected one of {", ".join(ROPE_TYPES)}.')
  return inv_freq.astype(np.float32), float(attention_factor)


def depends_on_call(config) -> bool:
  """Whether a token's rotation depends on which positions share its call (dynamic NTK):
  then one forward over several new positions differs from one position per call."""
  return getattr(config, 'rope_type', 'default') == 'dynamic'


def dynamic_frequencies(config, positions: jnp.ndarray) -> jnp.ndarray:
  """[H/2] float32 dynamic-NTK frequencies for a call at `positions` (any shape; the
  call's largest position decides), in transformers' float32 order of operations."""
  dim, original, factor = config.head_dim, config.rope_original_max, config.rope_factor
  seq_len = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, original).astype(jnp.float32)
  base = config.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
  exponents = jnp.asarray(np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  scaled = 1.0 / (base ** exponents)
  original_freqs = jnp.asarray(_default_inv_freq(config.rope_theta, dim).astype(np.float32))
  return jnp.where(seq_len > original, scaled, original_freqs)


def rotate(x: jnp.ndarray, positions: jnp.ndarray, config) -> jnp.ndarray:
  """The one rotary embedding (Su et al. 2021), with the config's scaling if any.

  x: [B, T, N, H]; positions: [B, T] int. Rotates pairs (first half, second half) of
  the head dim, as transformers' rotate_half. rope_type 'default' uses the plain
  frequencies theta^(-2i / H); the scaled types those of static_frequencies /
  dynamic_frequencies and their attention factor.
  """
  attention_factor = 1.0
  if config.rope_type == 'default':
    half = x.shape[-1] // 2
    inv_freq = config.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)   # [H/2]
  elif config.rope_type == 'dynamic':
    inv_freq = dynamic_frequencies(config, positions)
  else:
    inv_freq, attention_factor = static_frequencies(config)
    inv_freq = jnp.asarray(inv_freq)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq             # [B, T, H/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
