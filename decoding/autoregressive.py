"""Plain autoregressive decoding: the baseline every faster method is measured against.

One prefill call over the padded prompts, then one `lax.while_loop` that feeds each
row's last token and samples the next, one target call per iteration, until every
row is done. No Python loop per token, no host transfer inside the loop.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from decoding import base
from decoding.sampling import SamplingConfig, sample
from models import KVCache


@dataclasses.dataclass(frozen=True)
class AutoregressiveConfig:
  """Static settings (hashable: a static argument of jit)."""
  max_new_tokens: int
  cache_capacity: int                      # S: prompt + new tokens per row must fit
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = (2,)


@flax.struct.dataclass
class State:
  tokens: jax.Array        # [B, S] int32 buffer: prompt then new tokens
  lengths: jax.Array       # [B] int32 tokens in the buffer; the last is not yet in the cache
  limits: jax.Array        # [B] int32 buffer length at which a row stops
  cache: KVCache           # holds the keys/values of tokens[:, :lengths - 1]
  done: jax.Array          # [B] bool
  rng: jax.Array           # key for the next draw
  target_calls: jax.Array  # [] int32


def _append(state: State, new: jax.Array, eos_ids) -> State:
  """Writes `new` [B] after each unfinished row's tokens and updates the done flags."""
  tokens, lengths, done = base.commit(state.tokens, state.lengths, state.limits, state.done,
                                      new[:, None], jnp.ones_like(state.lengths), eos_ids)
  return state.replace(tokens=tokens, lengths=lengths, done=done)


@functools.partial(jax.jit, static_argnames=('model', 'config'))
def generate(model, params, prompts: jax.Array, prompt_lengths: jax.Array,
             config: AutoregressiveConfig, rng: jax.Array) -> base.Output:
  """Decodes a batch of right-padded prompts.

  model: a Flax module called as model.apply({'params': params}, tokens, positions,
    cache=...) -> ForwardOutput (models.Transformer); params: its parameters.
  prompts: [B, P] int32, right-padded; prompt_lengths: [B] int32 (>= 1, < S).
  """
  batch, prompt_len = prompts.shape
  capacity = config.cache_capacity
  vocab = model.config.vocab_size
  rows = jnp.arange(batch)

  cache = KVCache.empty(model.config, batch, capacity)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  prefill = model.apply({'params': params}, prompts, positions, cache=cache)
  last_logits = prefill.logits[rows, prompt_lengths - 1]                   # [B, V]
  rng, key = jax.random.split(rng)
  tokens = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_len].set(prompts)
  state = State(tokens=tokens, lengths=prompt_lengths, done=jnp.zeros((batch,), bool),
                limits=base.row_limits(prompt_lengths, config.max_new_tokens, capacity),
                cache=prefill.cache.replace(lengths=prompt_lengths), rng=rng,
                target_calls=jnp.ones((), jnp.int32))
  # Padding inside the buffer past each prompt must read as pad, not as prompt.
  state = state.replace(tokens=jnp.where(jnp.arange(capacity) < prompt_lengths[:, None],
                                         state.tokens, 0))
  state = _append(state, sample(key, last_logits, config.sampling, vocab), config.eos_ids)

  def body(state: State) -> State:
    last = state.tokens[rows, state.lengths - 1][:, None]                  # [B, 1]
    out = model.apply({'params': params}, last, (state.lengths - 1)[:, None],
                      cache=state.cache)
    rng, key = jax.random.split(state.rng)
    new = sample(key, out.logits[:, 0], config.sampling, vocab)             # [B]
    # Finished rows keep their cache length; the write they made lies past it.
    cache = out.cache.replace(lengths=jnp.where(state.done, state.cache.lengths,
                                                out.cache.lengths))
    state = state.replace(cache=cache, rng=rng, target_calls=state.target_calls + 1)
    return _append(state, new, config.eos_ids)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
  return base.Output(tokens=state.tokens, lengths=state.lengths,
                     prompt_lengths=prompt_lengths, target_calls=state.target_calls)
