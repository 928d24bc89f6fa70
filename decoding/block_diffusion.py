"""Block diffusion sampling (BD3-LM; Arriola et al., ICLR 2025, section 3.3 and Alg. 2):
blocks left to right, the masked tokens of one block denoised in parallel, an exact KV
cache of the clean blocks; one jit-compiled `lax.while_loop` for the whole generation.

Axis letters: B batch, S buffer / cache slots (the context rounded up to whole blocks),
K block size, V padded vocabulary (the mask token included).

Blocks are aligned to absolute positions (block b holds positions b K .. b K + K - 1), as
in training. The prefill writes every row's whole prompt blocks into the cache (block-
causal attention); a prompt that ends inside a block makes that block's first tokens
clean context and the rest [MASK]. Each row then cycles through two phases:

  denoise  one model call on its noised block (keys: the cached clean blocks and the block
           itself, bidirectional; the block's keys are written to its slots but not kept)
           and one sampler step on the masked positions; unmasked tokens never change
           (SUBS carry-over). When no [MASK] is left the block is committed through the
           driver's stop rule (EOS inside the block, max_new_tokens, the context);
  write    one call on the finished clean block: its keys/values, computed as the clean
           half of the training forward computes them, are written to its slots and kept
           (the cache's length moves past the block). The block is never touched again.

Every iteration makes ONE batched call in which each row is in its own phase at its own
block, so rows with ragged prompts and different progress decode together. A call is
skipped when no row needs it (an ancestral step that unmasked nothing: the denoiser is
time-agnostic, so its output would be the same; the reference sampler caches it too).
NFE counts, per row, the calls that row needed (prefill excluded; write calls included).

Samplers (the unmasked token is drawn from the denoiser's distribution after the one
sampling module's filters: temperature, top-k, nucleus top-p, min-p):
  ancestral      T steps per block on the grid t_i = 1 - i / T (MDLM / BD3-LM's DDPM
                 update): a masked token is unmasked between t and s < t with probability
                 (alpha_s - alpha_t) / (1 - alpha_t); the last step unmasks all.
  first_hitting  the first-hitting sampler (Zheng et al. 2024, "Masked diffusion models
                 are secretly time-agnostic masked models", Alg. 1): each step unmasks
                 exactly one masked token chosen uniformly (the time of the next unmasking
                 does not change the tokens of a time-agnostic denoiser), K steps per block.
"""
import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from decoding import driver
from decoding.sampling import sample
from models import KVCache, masks
from models.block_diffusion import BlockDiffusionLM, NoiseSchedule

SAMPLERS = ('ancestral', 'first_hitting')


@dataclasses.dataclass(frozen=True)
class BlockDiffusionConfig(driver.DecodeConfig):
  """Static settings: the driver's (max_new_tokens, cache_capacity, sampling, eos_ids)
  plus steps (T, ancestral denoising steps per block; None = the block size), sampler
  (ancestral | first_hitting), schedule (the noise schedule of the ancestral grid; the
  sampler's alpha_t) and use_cache (False: every call re-runs the whole sequence under
  the block-causal mask, no KV cache: the reference the cached sampler is tested
  against)."""
  steps: Optional[int] = None
  sampler: str = 'ancestral'
  schedule: NoiseSchedule = NoiseSchedule()
  use_cache: bool = True

  def __post_init__(self):
    if self.steps is not None and self.steps <= 0:
      raise ValueError(f'diffusion_steps must be > 0 (denoising steps per block), got '
                       f'{self.steps}.')
    if self.sampler not in SAMPLERS:
      raise ValueError(f'Unknown diffusion sampler {self.sampler!r}; expected one of '
                       f'{", ".join(SAMPLERS)}.')

  def generate_own(self, model, params, prompts, prompt_lengths, rng):
    """The driver hands the whole generation to `generate` below."""
    return generate(model, params, prompts, prompt_lengths, self, rng)


@flax.struct.dataclass
class State:
  tokens: jax.Array        # [B, S] committed tokens (prompt, finished blocks)
  lengths: jax.Array       # [B] committed tokens per row
  limits: jax.Array        # [B] the driver's stop length
  done: jax.Array          # [B] bool
  block: jax.Array         # [B, K] the current block (clean context, samples, [MASK])
  start: jax.Array         # [B] the current block's first position (a multiple of K)
  step: jax.Array          # [B] denoising steps taken in the current block
  write: jax.Array         # [B] bool: the block is finished and its KV must be written
  logits: jax.Array        # [B, K, V] the last call's denoiser logits
  fresh: jax.Array         # [B] bool: `logits` are those of the current block
  cache: Optional[KVCache]  # clean blocks [0, start) kept; None without a cache
  nfe: jax.Array           # [B] int32 model calls each row needed
  calls: jax.Array         # [] int32 batched model calls made (prefill included)
  rng: jax.Array


def buffer_size(capacity: int, block_size: int) -> int:
  """S: the context rounded up to whole blocks (a row's last block may pass its limit)."""
  return -(-capacity // block_size) * block_size


def check_model(model) -> None:
  """Raises ValueError unless `model` is a BD3-LM (models.BlockDiffusionLM)."""
  if not isinstance(model, BlockDiffusionLM):
    raise ValueError('--method=block_diffusion decodes a block diffusion model (trained '
                     f'with configs/bd3lm.py); this workdir holds a {type(model).__name__} '
                     'autoregressive model.')


def _call(model, params, config: BlockDiffusionConfig, state: State, size: int):
  """One batched model call on every row's current block -> ([B, K, V] denoiser logits,
  the cache with write rows' blocks kept)."""
  k = model.block_size
  slots = state.start[:, None] + jnp.arange(k)[None]                       # [B, K]
  if config.use_cache:
    mask = masks.block_slot_mask(state.start, k, size)
    out = model.apply({'params': params}, state.block, slots, mask, state.cache,
                      write_slots=slots)
    keep = jnp.where(state.write & ~state.done, state.start + k, state.cache.lengths)
    return model.denoiser_logits(out.logits), out.cache.keep(keep)
  # Uncached: the committed tokens with the block in place, all under the block-causal
  # mask, keys restricted to blocks <= the row's current one.
  rows = jnp.arange(state.tokens.shape[0])[:, None]
  sequence = state.tokens.at[rows, slots].set(state.block, mode='drop')
  positions = jnp.broadcast_to(jnp.arange(size), sequence.shape)
  visible = jnp.arange(size)[None] < (state.start + k)[:, None]            # [B, S]
  mask = masks.block_causal_mask(size, k)[None] & visible[:, None, :]
  logits = model.apply({'params': params}, sequence, positions, mask).logits
  return model.denoiser_logits(jnp.take_along_axis(logits, slots[..., None], axis=1)), None


def _denoise_step(model, config: BlockDiffusionConfig, state: State, rng):
  """One sampler step on every row's block -> (the new block [B, K], changed [B] bool)."""
  k = model.block_size
  vocab = model.mask_id                    # the tokenizer's vocabulary: [MASK] excluded
  token_key, move_key = jax.random.split(rng)
  proposals = sample(token_key, state.logits, config.sampling, vocab)      # [B, K]
  masked = state.block == model.mask_id
  if config.sampler == 'first_hitting':
    score = jnp.where(masked, jax.random.uniform(move_key, masked.shape), -1.0)
    reveal = masked & (jnp.arange(k)[None] == jnp.argmax(score, axis=1)[:, None])
  else:
    steps = config.steps or k
    t = 1.0 - state.step.astype(jnp.float32) / steps                      # [B]
    s = 1.0 - (state.step + 1).astype(jnp.float32) / steps
    alpha_t, alpha_s = config.schedule.alpha(t), config.schedule.alpha(s)
    p = jnp.where(state.step + 1 >= steps, 1.0,
                  (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12))
    reveal = masked & (jax.random.uniform(move_key, masked.shape) < p[:, None])
  return jnp.where(reveal, proposals, state.block), jnp.any(reveal, axis=1)


def _iteration(model, params, config: BlockDiffusionConfig, prompt_lengths, size: int,
               state: State) -> State:
  k = model.block_size
  active = ~state.done
  needs = active & (state.write | ~state.fresh)
  logits, cache = jax.lax.cond(
      jnp.any(needs), lambda: _call(model, params, config, state, size),
      lambda: (state.logits, state.cache))
  state = state.replace(logits=logits, cache=cache, fresh=state.fresh | needs,
                        nfe=state.nfe + needs.astype(jnp.int32),
                        calls=state.calls + jnp.any(needs).astype(jnp.int32))
  rng, key = jax.random.split(state.rng)

  # Write rows: the block's keys are kept; move to the next block, all [MASK].
  wrote = active & state.write
  start = jnp.where(wrote, state.start + k, state.start)
  block = jnp.where(wrote[:, None], model.mask_id, state.block)
  step = jnp.where(wrote, 0, state.step)
  fresh = state.fresh & ~wrote

  # Denoise rows: one sampler step, then commit a block with no [MASK] left.
  denoising = active & ~state.write
  stepped, changed = _denoise_step(model, config, state, key)
  block = jnp.where(denoising[:, None], stepped, block)
  step = jnp.where(denoising, step + 1, step)
  fresh = fresh & ~(denoising & changed)
  finished = denoising & ~jnp.any(block == model.mask_id, axis=1)
  # The block's new tokens: positions >= the row's prompt length (the prompt's tail may
  # lie in the first block).
  offset = jnp.clip(prompt_lengths - state.start, 0, k)                    # [B]
  index = jnp.minimum(offset[:, None] + jnp.arange(k)[None], k - 1)
  candidates = jnp.take_along_axis(block, index, axis=1)
  count = jnp.where(finished, k - offset, 0)
  tokens, lengths, done = driver.commit(state.tokens, state.lengths, state.limits,
                                        state.done | ~finished, candidates, count,
                                        config.eos_ids)
  done = state.done | (finished & done)
  write = jnp.where(wrote, False, state.write | (finished & ~done))
  return state.replace(tokens=tokens, lengths=lengths, done=done, block=block, start=start,
                       step=step, write=write, fresh=fresh, rng=rng)


def start_state(model, params, prompts: jax.Array, prompt_lengths: jax.Array,
                config: BlockDiffusionConfig, rng: jax.Array) -> State:
  """The loop state after the prefill: the prompts' whole blocks in the cache (block-
  causal, one call), every row at the block holding its prompt's end (its prompt tail
  clean, the rest [MASK]). prompts: [B, P] right-padded; prompt_lengths: [B].
  Raises ValueError for a model that is not a BD3-LM."""
  check_model(model)
  k = model.block_size
  batch, prompt_len = prompts.shape
  size = buffer_size(config.cache_capacity, k)
  tokens = driver.token_buffer(prompts, prompt_lengths, size)
  start = prompt_lengths // k * k                                          # [B]
  calls = jnp.zeros((), jnp.int32)
  cache = None
  if config.use_cache:
    padded = -(-prompt_len // k) * k
    positions = jnp.broadcast_to(jnp.arange(padded), (batch, padded))
    # Block-causal over slots: the query in block j sees the slots of blocks <= j.
    mask = (jnp.arange(size) // k)[None, :] <= (jnp.arange(padded) // k)[:, None]
    out = model.apply({'params': params}, tokens[:, :padded], positions,
                      jnp.broadcast_to(mask, (batch, padded, size)),
                      KVCache.empty(model.config, batch, size), write_slots=positions)
    cache = out.cache.keep(start)
    calls = calls + 1
  in_block = start[:, None] + jnp.arange(k)[None]
  block = jnp.where(in_block < prompt_lengths[:, None],
                    jnp.take_along_axis(tokens, jnp.minimum(in_block, size - 1), axis=1),
                    model.mask_id)
  zeros = jnp.zeros((batch,), jnp.int32)
  return State(tokens=tokens, lengths=prompt_lengths.astype(jnp.int32),
               limits=driver.row_limits(prompt_lengths, config.max_new_tokens,
                                        config.cache_capacity),
               done=jnp.zeros((batch,), bool), block=block, start=start, step=zeros,
               write=jnp.zeros((batch,), bool),
               logits=jnp.zeros((batch, k, model.config.padded_vocab_size), jnp.float32),
               fresh=jnp.zeros((batch,), bool), cache=cache, nfe=zeros, calls=calls, rng=rng)


def step_fn(model, params, config: BlockDiffusionConfig, prompt_lengths: jax.Array):
  """The loop body: State -> State (one batched call, one phase step per row)."""
  size = buffer_size(config.cache_capacity, model.block_size)
  return functools.partial(_iteration, model, params, config, prompt_lengths, size)


@functools.partial(jax.jit, static_argnames=('model', 'config'))
def generate(model, params, prompts: jax.Array, prompt_lengths: jax.Array,
             config: BlockDiffusionConfig, rng: jax.Array) -> driver.Output:
  """Samples continuations of right-padded prompts with a BD3-LM, block by block.

  model: a models.BlockDiffusionLM; params: its parameters.
  prompts: [B, P] int32 right-padded; prompt_lengths: [B] (>= 1, < cache_capacity).
  Returns driver.Output (tokens [B, S] with S = cache_capacity rounded up to whole
  blocks); stats: nfe [B] (model calls each row needed, prefill excluded),
  denoise_calls [] (batched calls after the prefill). target_calls counts every batched
  call, the prefill included.
  Raises ValueError (while tracing, on the host) for a model that is not a BD3-LM.
  Source: Arriola et al. 2025, Alg. 2 (KV-cached block sampling).
  """
  state = start_state(model, params, prompts, prompt_lengths, config, rng)
  prefill_calls = state.calls
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                             step_fn(model, params, config, prompt_lengths), state)
  finish, stop_id = driver.finish_reasons(state.tokens, state.lengths, prompt_lengths,
                                          config.max_new_tokens, config.eos_ids)
  return driver.Output(tokens=state.tokens, lengths=state.lengths,
                       prompt_lengths=prompt_lengths, target_calls=state.calls,
                       stats={'nfe': state.nfe, 'denoise_calls': state.calls - prefill_calls},
                       finish=finish, stop_id=stop_id)
