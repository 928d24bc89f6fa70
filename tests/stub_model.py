"""A stand-in model whose next-token logits are a lookup table, for exact decoder tests.

`params = {'table': [V_padded, V_padded]}`: the logits after token t are table[t],
whatever came before. It honours the model contract decoders rely on: it takes
(tokens, positions, attention_mask, cache) and returns a ForwardOutput whose cache
lengths advanced by the number of tokens when it appends (no explicit write_slots).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from models import ForwardOutput


@dataclasses.dataclass(frozen=True)
class StubConfig:
  vocab_size: int
  padded_vocab_size: int
  num_layers: int = 1
  num_kv_heads: int = 1
  head_dim: int = 1
  activation_dtype: type = jnp.float32

  @property
  def cache_layers(self) -> int:
    return self.num_layers


def at_positions(logits, logits_at):
  """logits [B, T, V] as models.Transformer returns them: all, or [B, n, V] at the
  positions logits_at [B, n] (the prefill's last prompt position)."""
  if logits_at is None:
    return logits
  return jnp.take_along_axis(logits, logits_at[..., None], axis=1)


@dataclasses.dataclass(frozen=True)
class StubModel:
  config: StubConfig
  traces = [0]  # apply() calls while tracing, across instances

  def apply(self, variables, tokens, positions, attention_mask=None, cache=None, write_slots=None,
            logits_at=None):
    """models.Transformer's call: logits [B, T, V], or [B, n, V] at logits_at [B, n]."""
    del positions, attention_mask
    StubModel.traces[0] += 1
    logits = at_positions(variables['params']['table'][tokens], logits_at)   # [B, T, V]
    appended = 0 if write_slots is not None else tokens.shape[1]  # explicit slots keep nothing
    new_cache = None if cache is None else cache.replace(lengths=cache.lengths + appended)
    return ForwardOutput(logits=logits, hidden=jnp.zeros(tokens.shape + (1,)), cache=new_cache)


def successor_table(vocab_size, padded, last, eos):
  """After t comes t + 1 for t < last, then EOS: rows ending on different tokens stop
  at different steps."""
  table = np.full((padded, padded), -10.0, np.float32)
  for t in range(padded):
    table[t, t + 1 if t < last else eos] = 10.0
  return {'table': jnp.asarray(table)}


def random_table(seed, vocab_size, padded):
  table = np.random.default_rng(seed).normal(size=(padded, padded)).astype(np.float32)
  table[:, vocab_size:] = 50.0  # Padded ids: huge logits that must never be sampled.
  return {'table': jnp.asarray(table)}
