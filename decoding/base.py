"""Pieces every decoding method shares: the output, prompt checks, stop rules.

Axis letters: B batch, P padded prompt length, S cache capacity (= token buffer
length), V padded vocabulary.

Layout: row b's tokens sit left-aligned in a [B, S] buffer whose index is also the
token's position and its KV-cache slot. A row is finished when it emits an EOS id,
reaches max_new_tokens, or fills the buffer.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Output:
  tokens: jax.Array          # [B, S] int32: prompt, then new tokens, then pad (0)
  lengths: jax.Array         # [B] int32: prompt + new tokens per row
  prompt_lengths: jax.Array  # [B] int32
  target_calls: jax.Array    # [] int32: forward calls of the target model, prefill included
  # Method-specific statistics, e.g. draft_calls [] and accepted_histogram [K + 1]
  # (row-rounds by number of accepted drafted tokens) for speculative methods.
  stats: dict = flax.struct.field(default_factory=dict)

  @property
  def new_tokens(self) -> jax.Array:
    """[B] int32: tokens generated per row (an EOS that ended a row included)."""
    return self.lengths - self.prompt_lengths

  def completions(self) -> list[list[int]]:
    """The new tokens of each row, as host lists."""
    tokens, lengths, starts = jax.device_get((self.tokens, self.lengths, self.prompt_lengths))
    return [tokens[b, starts[b]:lengths[b]].tolist() for b in range(tokens.shape[0])]


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> right-padded [B, P] int32 array and [B] lengths."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  out = np.full((len(prompts), max(int(lengths.max(initial=0)), 1)), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    out[row, :len(prompt)] = prompt
  return out, lengths


def check_prompts(prompts, prompt_lengths, *, capacity: int, vocab_size: int,
                  max_new_tokens: int) -> None:
  """Clear errors for bad input, raised on the host before anything compiles."""
  prompts, lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be > 0, got {max_new_tokens}.')
  if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
    raise ValueError(f'prompts must be [B, P] with lengths [B]; got {prompts.shape} and '
                     f'{lengths.shape}.')
  if prompts.shape[1] > capacity:
    raise ValueError(f'The padded prompt length {prompts.shape[1]} is longer than the '
                     f'context ({capacity} tokens).')
  for row, n in enumerate(lengths.tolist()):
    if n <= 0:
      raise ValueError(f'Prompt {row} is empty: give at least one token.')
    if n > capacity:
      raise ValueError(f'Prompt {row} has {n} tokens, longer than the context '
                       f'({capacity} tokens).')
    if n == capacity:
      raise ValueError(f'Prompt {row} has {n} tokens and fills the context ({capacity} '
                       'tokens): it leaves no room for new tokens.')
    ids = prompts[row, :n]
    if ids.min() < 0 or ids.max() >= vocab_size:
      bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
      raise ValueError(f'Prompt {row} holds token id {bad}, outside the vocabulary '
                       f'[0, {vocab_size}).')


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def token_buffer(prompts: jax.Array, prompt_lengths: jax.Array, capacity: int) -> jax.Array:
  """[B, capacity] int32 buffer holding each row's prompt, zeros past its length."""
  batch, prompt_len = prompts.shape
  tokens = jnp.zeros((batch, capacity), jnp.int32).at[:, :prompt_len].set(prompts)
  return jnp.where(jnp.arange(capacity) < prompt_lengths[:, None], tokens, 0)


def row_limits(prompt_lengths: jax.Array, max_new_tokens: int, capacity: int) -> jax.Array:
  """[B] the buffer length at which each row stops: prompt + max_new_tokens, or full."""
  return jnp.minimum(prompt_lengths + max_new_tokens, capacity)


def commit(tokens, lengths, limits, done, candidates, count, eos_ids):
  """Appends candidates[b, :count[b]] after each unfinished row's tokens, cut after the
  first EOS id and at the row's limit; the stop rule of every method.

  tokens: [B, S]; lengths, limits, count: [B] int32; done: [B] bool;
  candidates: [B, C] int32. Returns (tokens, lengths, done).
  """
  batch, width = candidates.shape
  index = jnp.arange(width)[None]
  eos = is_eos(candidates, eos_ids) & (index < count[:, None])
  first_eos = jnp.min(jnp.where(eos, index, width), axis=1)
  count = jnp.minimum(jnp.minimum(count, first_eos + 1), limits - lengths)
  count = jnp.where(done, 0, count)
  slots = jnp.where(index < count[:, None], lengths[:, None] + index, tokens.shape[1])
  tokens = tokens.at[jnp.arange(batch)[:, None], slots].set(candidates, mode='drop')
  lengths = lengths + count
  return tokens, lengths, done | (first_eos < count) | (lengths >= limits)
