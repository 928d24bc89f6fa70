"""Jacobi decoding: the target refines a window of its own guesses in parallel.

Santilli et al. 2023, "Accelerating Transformer Inference for Translation via Parallel
Decoding" (section 3: Jacobi and Gauss-Seidel iterations of greedy decoding): greedy
decoding is the fixed point of y_i = argmax p(. | x, y_<i) for i = 1..n, and the
Jacobi iteration updates every y_i at once from the previous iterate, so one target call
refines n positions. At least the first position is exact after each call, so it never
needs more calls than autoregressive decoding; it needs fewer where the model's
predictions stop depending on the still-wrong tokens before them (repetitive text).

As a proposer of the ONE speculative round (decoding/driver.py): the window of n
guesses is a deterministic chain [root, g_1 .. g_n]; the driver's one target call on it
is a Jacobi iteration, the verifier keeps the matching greedy prefix (the fixed-point
prefix) plus the target's next token. The guesses are point masses (Proposal.draft_logp
None), so under sampling the same verify step is the speculative point-mass rule
(decoding/verify.py) and Jacobi decoding stays lossless. The rest of the window is
carried to the next round, shifted: the target's predictions at the unaccepted
positions become the new guesses (the Jacobi update), and the n_accepted + 1 positions
that open at the tail are padded with the last prediction repeated (the window's only
information about them; repetition is the commonest local structure of text, runs of
spaces, indentation, repeated tokens, and costs nothing). The first window (after the
prefill) is the prefill's greedy next token repeated.

`collect_trajectories` runs the same Jacobi step block by block over a batch of prompts
and records every iterate: the data collection of consistency training (CLLM; Kou et al.
2024, "CLLMs: Consistency Large Language Models", Algorithm 1).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver
from decoding.lookup import draft_room
from decoding.proposal import Proposal, Proposer
from decoding.sampling import SamplingConfig, sample
from models import KVCache

MAX_WINDOW = 64
INITS = ('context', 'repeat')


@dataclasses.dataclass(frozen=True)
class JacobiConfig(driver.DecodeConfig):
  """Static settings of Jacobi decoding (hashable: a static argument of jit)."""
  window: int = 4            # n: guesses refined per target call

  def __post_init__(self):
    if not 1 <= self.window <= MAX_WINDOW:
      raise ValueError(f'jacobi_window must be in [1, {MAX_WINDOW}], got {self.window}.')

  def proposer(self, model, drafter) -> 'JacobiProposer':
    del drafter
    return JacobiProposer(self.window, model.config.vocab_size)


def jacobi_update(logits: jax.Array, vocab_size: int) -> jax.Array:
  """The Jacobi update read off one target call on [root, y_1 .. y_n]: [B, n + 1, V]
  logits -> [B, n + 1] int32, entry i = argmax p(. | x, y_<=i), the new guess for
  position root + i + 1 (greedy as autoregressive decoding picks it: sampling.sample)."""
  return sample(None, logits, SamplingConfig(), vocab_size)


class JacobiProposer(Proposer):
  """The window of n guesses is the proposer's state [B, n] int32."""

  def __init__(self, window: int, vocab_size: int):
    self.max_depth, self.vocab_size = window, vocab_size

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    del params, prompts, prompt_lengths, cache_size
    first = jacobi_update(prefill.logits[:, 0], self.vocab_size)   # [B]: the last position's
    return jnp.repeat(first[:, None], self.max_depth, axis=1), jnp.zeros((), jnp.int32)

  def propose(self, params, window, loop_state, key):
    del params, key
    rows = jnp.arange(loop_state.tokens.shape[0])
    root = loop_state.tokens[rows, loop_state.lengths - 1]
    return (Proposal.chain(root, window, num_drafted=draft_room(loop_state, self.max_depth)),
            window, jnp.zeros((), jnp.int32))

  def observe(self, params, window, loop_state, verified, path, num_accepted):
    del params, window, loop_state, path
    update = jacobi_update(verified.logits, self.vocab_size)                 # [B, n + 1]
    # Guess j of the next window sits at position root + n_accepted + 2 + j: the update
    # at node n_accepted + 1 + j; past node n, the last update repeated.
    index = jnp.minimum(num_accepted[:, None] + 1 + jnp.arange(self.max_depth)[None],
                        self.max_depth)
    return jnp.take_along_axis(update, index, axis=1)


def initial_guess(init: str, key: jax.Array, tokens: jax.Array, lengths: jax.Array,
                  size: int) -> jax.Array:
  """A block's first Jacobi iterate, [B, size] int32, from each row's context
  tokens[b, :lengths[b]].

  'context': tokens drawn uniformly (with replacement) from the row's context, as the
    CLLM reference code initialises its trajectories (Kou et al. 2024, Algorithm 1:
    a random initial guess; drawing from the context keeps it in-distribution text).
  'repeat': the context's last token repeated (deterministic).
  """
  rows = jnp.arange(tokens.shape[0])[:, None]
  if init == 'repeat':
    return jnp.broadcast_to(tokens[rows, lengths[:, None] - 1], (tokens.shape[0], size))
  if init == 'context':
    u = jax.random.uniform(key, (tokens.shape[0], size))
    index = jnp.minimum((u * lengths[:, None]).astype(jnp.int32), lengths[:, None] - 1)
    return tokens[rows, index]
  raise ValueError(f'init must be one of {INITS}, got {init!r}.')


def collect_trajectories(model, params, prompts, prompt_lengths, *, block_size: int,
                         num_blocks: int, max_iterations: int, rng, init: str = 'context'
                         ) -> dict:
  """Greedy Jacobi trajectories for consistency training (CLLM; Kou et al. 2024,
  Algorithm 1, data collection).

  For each prompt, block after block: start from an initial guess y^0 of block_size
  tokens (`initial_guess`), iterate y^(k+1)_i = argmax p(. | x, y^k_<i) for all i at once
  (one target call on [last context token, y^k], the cached context reused) until
  y^(k+1) = y^k, the fixed point, which equals greedy autoregressive decoding of the
  block; append it to the context x and go on. Rows run in parallel, each to its own
  fixed point; a jitted lax.scan over blocks, a lax.while_loop over iterations. EOS is
  not special here: every block is decoded.

  model, params: the target (called like models.Transformer with a KV cache).
  prompts: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
  block_size: n tokens per block; num_blocks: blocks per prompt; max_iterations: J,
    iterates recorded per block (J = block_size + 1 holds every iterate); rng: the key
    of the 'context' initial guesses; init: 'context' or 'repeat' (initial_guess).

  Returns numpy arrays, R = B * num_blocks rows, prompt-major (row b * num_blocks + k
  is block k of prompt b), C = P + (num_blocks - 1) * block_size:
    context          [R, C] int32  prompt + earlier blocks' fixed points, right-padded 0
    context_lengths  [R] int32
    states           [R, J, block_size] int32  y^0, y^1, ...; entries past the row's
                     iteration count repeat the fixed point (iterates past J are not kept)
    iterations       [R] int32  m: the first iterate equal to the fixed point (y^m),
                     0 <= m <= block_size; the block took m + 1 target calls
    fixed_point      [R, block_size] int32
  Raises ValueError (before compiling) for sizes < 1, an unknown init, or bad prompt
  shapes / lengths.
  """
  prompts, prompt_lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  for name, value in (('block_size', block_size), ('num_blocks', num_blocks),
                      ('max_iterations', max_iterations)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}.')
  if prompts.ndim != 2 or prompt_lengths.shape != prompts.shape[:1]:
    raise ValueError(f'prompts must be [B, P] with prompt_lengths [B]; got {prompts.shape} '
                     f'and {prompt_lengths.shape}.')
  if prompt_lengths.min() < 1 or prompt_lengths.max() > prompts.shape[1]:
    raise ValueError(f'prompt_lengths must be in [1, {prompts.shape[1]}], got '
                     f'{prompt_lengths.tolist()}.')
  out = _collect(model, params, jnp.asarray(prompts, jnp.int32),
                 jnp.asarray(prompt_lengths, jnp.int32), rng, int(block_size), int(num_blocks),
                 int(max_iterations), init)
  return {name: np.asarray(value) for name, value in out.items()}


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _collect(model, params, prompts, prompt_lengths, rng, block_size, num_blocks,
             max_iterations, init):
  batch, prompt_len = prompts.shape
  rows = jnp.arange(batch)
  width = prompt_len + (num_blocks - 1) * block_size       # C: the longest context
  capacity = width + block_size                            # S: context + the last block
  tokens = driver.token_buffer(prompts, prompt_lengths, capacity)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  cache = model.apply({'params': params}, prompts, positions,
                      cache=KVCache.empty(model.config, batch, capacity)).cache
  # The driver's invariant: the cache holds tokens[:L - 1]; the last one is the root.
  cache = cache.keep(prompt_lengths - 1)
  vocab = model.config.vocab_size
  keep_iterates = jnp.arange(max_iterations)[None, :, None]

  def block(carry, index):
    tokens, lengths, cache = carry
    root = tokens[rows, lengths - 1]
    slots = (lengths - 1)[:, None] + jnp.arange(block_size + 1)[None]     # [B, n + 1]
    guess = initial_guess(init, jax.random.fold_in(rng, index), tokens, lengths, block_size)
    states = jnp.zeros((batch, max_iterations, block_size), jnp.int32).at[:, 0].set(guess)

    def iterate(s):  # One Jacobi step: one target call on [root, y].
      step, y, states, done, iterations, cache = s
      out = model.apply({'params': params}, jnp.concatenate([root[:, None], y], axis=1),
                        slots, None, cache, write_slots=slots)
      update = jacobi_update(out.logits, vocab)[:, :block_size]
      fixed = jnp.all(update == y, axis=1)
      iterations = jnp.where(fixed & ~done, step, iterations)
      done = done | fixed
      y = jnp.where(done[:, None], y, update)
      states = states.at[:, step + 1].set(y, mode='drop')
      return step + 1, y, states, done, iterations, out.cache

    # y^n is exact (position i is exact after i + 1 steps), so n + 1 calls confirm it.
    init_state = (jnp.zeros((), jnp.int32), guess, states, jnp.zeros((batch,), bool),
                  jnp.full((batch,), block_size, jnp.int32), cache)
    _, y, states, _, iterations, cache = jax.lax.while_loop(
        lambda s: jnp.any(~s[3]) & (s[0] <= block_size), iterate, init_state)
    states = jnp.where(keep_iterates > iterations[:, None, None], y[:, None], states)
    record = dict(context=tokens[:, :width], context_lengths=lengths, states=states,
                  iterations=iterations, fixed_point=y)
    # Commit the fixed point; the last call cached [root, y], so keep through y_(n-1).
    tokens = tokens.at[rows[:, None], lengths[:, None] + jnp.arange(block_size)[None]].set(y)
    return (tokens, lengths + block_size, cache.keep(lengths + block_size - 1)), record

  _, records = jax.lax.scan(block, (tokens, prompt_lengths, cache), jnp.arange(num_blocks))
  # [num_blocks, B, ...] -> [B * num_blocks, ...], prompt-major.
  return {name: jnp.swapaxes(value, 0, 1).reshape((batch * num_blocks,) + value.shape[2:])
          for name, value in records.items()}
