"""The round driver: what every decoding method shares, and the one speculative round.

Axis letters: B batch, P padded prompt length, S cache capacity (= token buffer
length, plus a method's slack for tree nodes), N proposal nodes, D proposal depth,
V padded vocabulary.

Layout: row b's tokens sit left-aligned in a [B, S] buffer whose index is also the
token's position and its KV-cache slot. A row is finished when it emits an EOS id,
reaches max_new_tokens, or fills the buffer. Rows advance by their own amounts.

Every method is `generate` below: one prefill call over the padded prompts, the first
token, then one `lax.while_loop` of rounds until every row is done; no Python loop per
token, no host transfer inside the loop. A method is its config (a DecodeConfig
subclass: the settings, hashable, a static jit argument) and the proposer the config
builds. With no proposer a round is plain autoregressive decoding (one target call,
one sampled token). Otherwise each round is the ONE speculative round:

    proposal = proposer.propose(...)        # decoding/proposal.py: tokens, tree shape
    one target call on the proposal's nodes under its attention mask (tree or causal)
    target log-probs (decoding/sampling.py, the filters plain sampling uses)
    verify.accept -> accepted path, its length n, the next token
    move the accepted path's cache slots into sequence order
    proposer.observe(...)                   # the drafter's own state for the next round
    commit: n accepted tokens + the next one, cut at an EOS id or the row's limit

Cache invariant at the start of a round (L = lengths[b], the buffer's token count):
the target cache holds tokens[:L - 1]; the root of every proposal is token L - 1.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoding import trees, verify
from decoding.proposal import Proposer
from decoding.sampling import SamplingConfig, greedy_ids, log_probs, sample
from models import AnySubsetLM, BlockDiffusionLM, KVCache, masks, rope


@flax.struct.dataclass
class Output:
  tokens: jax.Array          # [B, S] int32: prompt, then new tokens, then pad (0)
  lengths: jax.Array         # [B] int32: prompt + new tokens per row
  prompt_lengths: jax.Array  # [B] int32
  # [] int32: calls of the target model, the prefill counted as one (its forward calls,
  # one per chunk, are stats['prefill_calls'] where the method's prefill is chunked)
  target_calls: jax.Array
  # Speculative methods: draft_calls [] and accepted_histogram [D + 1] (row-rounds by
  # number of accepted drafted tokens).
  stats: dict = flax.struct.field(default_factory=dict)
  # [B] int32 why each row ended (FINISH_STOP / FINISH_LENGTH / FINISH_CONTEXT), and
  # [B] int32 the stop id that ended it (-1 unless FINISH_STOP); see `finish_reasons`.
  finish: Optional[jax.Array] = None
  stop_id: Optional[jax.Array] = None

  def finish_reasons(self) -> list[dict]:
    """Per row, as host values: {'reason': 'stop', 'stop_id': id} (a stop id ended it),
    {'reason': 'length'} (max_new_tokens) or {'reason': 'context'} (the context / cache
    capacity cut it first)."""
    finish, stop_id = jax.device_get((self.finish, self.stop_id))
    out = []
    for reason, token in zip(finish.tolist(), stop_id.tolist()):
      out.append({'reason': FINISH_REASONS[reason], 'stop_id': token} if reason == FINISH_STOP
                 else {'reason': FINISH_REASONS[reason]})
    return out

  @property
  def new_tokens(self) -> jax.Array:
    """[B] int32: tokens generated per row (an EOS that ended a row included)."""
    return self.lengths - self.prompt_lengths

  def completions(self) -> list[list[int]]:
    """The new tokens of each row, as host lists."""
    tokens, lengths, starts = jax.device_get((self.tokens, self.lengths, self.prompt_lengths))
    return [tokens[b, starts[b]:lengths[b]].tolist() for b in range(tokens.shape[0])]


FINISH_STOP, FINISH_LENGTH, FINISH_CONTEXT = 0, 1, 2
FINISH_REASONS = ('stop', 'length', 'context')


def finish_reasons(tokens, lengths, prompt_lengths, max_new_tokens: int, eos_ids):
  """Why each row ended, from the output arrays alone (no per-token loop): its last
  token is a stop id -> stop (that id; commit cuts right after the first one); else it
  has max_new_tokens new tokens -> length; else the buffer (context / cache capacity)
  was full -> context. Returns ([B] int32 reason, [B] int32 stop id or -1)."""
  last = tokens[jnp.arange(tokens.shape[0]), lengths - 1]
  stopped = is_eos(last, eos_ids) & (lengths > prompt_lengths)
  reason = jnp.where(stopped, FINISH_STOP,
                     jnp.where(lengths - prompt_lengths >= min(max_new_tokens, tokens.shape[1]),
                               FINISH_LENGTH,
                               FINISH_CONTEXT)).astype(jnp.int32)
  return reason, jnp.where(stopped, last, -1).astype(jnp.int32)


# Prompt tokens per prefill call by default (chunked_prefill): measured best of 128 / 256 /
# 512 on SmolLM2 (README, "Real speed").
PREFILL_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """The settings every method has (hashable: a static argument of jit). A method's
  config subclasses it with its own fields and builds its proposer."""
  max_new_tokens: int
  cache_capacity: int                      # S: prompt + new tokens per row must fit
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = (2,)
  # prompt tokens per prefill call (chunked_prefill; 0 = one call); keyword-only, so the
  # methods' configs keep their positional fields
  prefill_chunk: int = dataclasses.field(default=PREFILL_CHUNK, kw_only=True)

  def generate_own(self, model, params, prompts, prompt_lengths, rng) -> Optional['Output']:
    """A family that does not verify (block diffusion sampling) runs its own loop with
    the driver's pieces (buffer, commit, stop rule, Output) and returns its Output here;
    None = the driver's rounds."""
    del model, params, prompts, prompt_lengths, rng
    return None

  def proposer(self, model, drafter) -> Optional[Proposer]:
    """The method's drafter for the target `model` and the second module `drafter`
    (a draft model, heads, or None); None = plain autoregressive rounds."""
    del model, drafter
    return None

  @property
  def exact(self) -> bool:
    """Whether the method reproduces the target (False: a lossy method that does not
    verify, e.g. CALM early exit, decoding/early_exit.py)."""
    return True

  @property
  def acceptance(self) -> Optional[verify.TypicalAcceptance]:
    """The acceptance rule: None = exact (lossless); a lossy rule otherwise."""
    return None

  @property
  def chain_rule(self) -> str:
    """The exact rule for a chain drawn from a draft (verify.CHAIN_RULES): block
    verification unless a method's config chooses the token-level rule."""
    return 'block'


@flax.struct.dataclass
class Params:
  """The dynamic parameter trees of one decoding call."""
  target: Any
  drafter: Any = None


@flax.struct.dataclass
class State:
  tokens: jax.Array        # [B, S] int32 buffer: prompt then committed tokens
  lengths: jax.Array       # [B] int32 tokens in the buffer
  limits: jax.Array        # [B] int32 buffer length at which a row stops
  target_cache: KVCache    # holds tokens[:, :lengths - 1]
  done: jax.Array          # [B] bool
  rng: jax.Array
  target_calls: jax.Array  # [] int32
  draft_calls: jax.Array   # [] int32
  histogram: jax.Array     # [D + 1] int32 row-rounds by number of accepted drafts
  proposer: Any = None     # the proposer's own state across rounds (a pytree)
  # [budget] int32 accepted drafted nodes by their rank in a dynamic tree's reranking
  # (Proposal.ranks), or None: tokens(b) = 1 + sum(rank_histogram[:b]) / row-rounds is
  # what the budget-b tree would have accepted in the same rounds under greedy.
  rank_histogram: Any = None


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> right-padded [B, P] int32 array and [B] lengths."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  out = np.full((len(prompts), max(int(lengths.max(initial=0)), 1)), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    out[row, :len(prompt)] = prompt
  return out, lengths


def check_prompts(prompts, prompt_lengths, *, capacity: int, vocab_size: int,
                  max_new_tokens: int) -> None:
  """Clear errors for bad input, raised on the host before anything compiles.

  Raises ValueError naming the problem: max_new_tokens <= 0, shapes, an empty prompt,
  a prompt that does not leave room in the context, a token id outside the vocabulary.
  """
  prompts, lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be > 0, got {max_new_tokens}.')
  if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
    raise ValueError(f'prompts must be [B, P] with lengths [B]; got {prompts.shape} and '
                     f'{lengths.shape}.')
  if prompts.shape[1] > capacity:
    raise ValueError(f'The prompt length {prompts.shape[1]} (the longest, padded) is longer '
                     f'than the context ({capacity} tokens: --max_context).')
  for row, n in enumerate(lengths.tolist()):
    if n <= 0:
      raise ValueError(f'Prompt {row} is empty: give at least one token.')
    if n > capacity:
      raise ValueError(f'Prompt {row} has {n} tokens, longer than the context '
                       f'({capacity} tokens: --max_context).')
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
  """[B] the buffer length at which each row stops: prompt + max_new_tokens, or full.
  (max_new_tokens is capped at the capacity first: a Python int past int32 would
  overflow the sum.)"""
  return jnp.minimum(prompt_lengths + min(max_new_tokens, capacity), capacity)


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


def commit_state(state: State, candidates: jax.Array, count: jax.Array, eos_ids) -> State:
  """`commit` on a loop state's buffer."""
  tokens, lengths, done = commit(state.tokens, state.lengths, state.limits, state.done,
                                 candidates, count, eos_ids)
  return state.replace(tokens=tokens, lengths=lengths, done=done)


def _layer_hidden(wanted: bool) -> dict:
  """The target call's keyword asking for per-block hidden states, only when wanted (a
  proposer's needs_layer_hidden), so models without the argument stay callable."""
  return {'return_layer_hidden': True} if wanted else {}


def prefill_calls(model_config, prompt_len: int, chunk: int) -> int:
  """The forward calls chunked_prefill makes for prompts padded to `prompt_len` tokens
  (static): ceil(prompt_len / chunk); 1 for chunk 0, for a prompt that fits in one chunk
  and for a dynamic-NTK model (always one call). Raises ValueError for a negative chunk."""
  if chunk < 0:
    raise ValueError(f'prefill_chunk={chunk}; expected >= 1, or 0 for one call.')
  if not chunk or prompt_len <= chunk or rope.depends_on_call(model_config):
    return 1
  return -(-prompt_len // chunk)


def chunked_prefill(model, params, prompts, prompt_lengths, cache, chunk: int,
                    layer_hidden: bool = False):
  """The target's forward over right-padded prompts [B, P] (lengths [B]) into an empty
  cache, `chunk` tokens per call, as one call over all P would give it (float32 sums in
  another order: logits agree to rounding). Returns a ForwardOutput: logits [B, 1, V] at
  each row's last prompt position only, hidden [B, P, D] (and layer_hidden, future
  logits) at every position, the cache with P slots written (its lengths P or more; the
  caller keeps the prompts' lengths).

  A prompt of P <= chunk tokens is one call; a longer one is a lax.scan over n = ceil(P /
  chunk) calls of ceil(P / n) tokens (one trace of the trunk: the compile time does not
  grow with P), each appending its tokens to the cache and attending over the smallest
  key window covering the slots written so far (models.transformer._cached_attend). One
  call over P tokens attends every query over the whole P-slot window, half of which its
  causal mask throws away; in chunks the attention of early tokens reads short windows.
  It is what llama.cpp does (512-token batches) and vLLM's chunked prefill. Measured on
  SmolLM2-135M (2 CPU cores, a 1209-token prompt, batch 1): 2.85 -> 2.21 s in 5 calls of
  242 tokens (README, "Real speed"). chunk 0: one call. A model with dynamic NTK rotary
  scaling always takes one call: its frequencies follow a call's largest position
  (models/rope.py), so chunks would rotate their keys otherwise than transformers' one
  forward does. Raises ValueError for a negative chunk.
  """
  batch, prompt_len = prompts.shape
  calls = prefill_calls(model.config, prompt_len, chunk)
  last = (prompt_lengths - 1)[:, None]                                         # [B, 1]
  extra = _layer_hidden(layer_hidden)
  if calls == 1:
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    return model.apply({'params': params}, prompts, positions, cache=cache, logits_at=last,
                       **extra)
  chunk = -(-prompt_len // calls)   # calls of equal size: at most calls - 1 padded tokens
  pieces = jnp.pad(prompts, ((0, 0), (0, calls * chunk - prompt_len)))
  pieces = jnp.swapaxes(pieces.reshape(batch, calls, chunk), 0, 1)             # [n, B, C]

  def call(cache, start, piece):
    positions = start + jnp.broadcast_to(jnp.arange(chunk), (batch, chunk))
    # Slots past the capacity (the last chunk's padding) are dropped by the cache write.
    return model.apply({'params': params}, piece, positions, cache=cache,
                       logits_at=jnp.clip(last - start, 0, chunk - 1), **extra)

  def step(carry, xs):
    cache, logits = carry
    start, piece = xs
    out = call(cache, start, piece)
    here = (last >= start) & (last < start + chunk)                             # [B, 1]
    logits = jnp.where(here[..., None], out.logits, logits)
    return (out.cache, logits), (out.hidden, out.layer_hidden, out.future_logits)

  shapes = jax.eval_shape(call, cache, jnp.zeros((), jnp.int32), pieces[0])
  logits = jnp.zeros(shapes.logits.shape, shapes.logits.dtype)
  starts = jnp.arange(calls, dtype=jnp.int32) * chunk
  (cache, logits), (hidden, layers, future) = jax.lax.scan(step, (cache, logits),
                                                           (starts, pieces))
  # [n, B, C, ...] -> [B, P, ...]
  joined = lambda x: jnp.swapaxes(x, 0, 1).reshape((batch, calls * chunk) + x.shape[3:])[
      :, :prompt_len]
  return shapes.replace(logits=logits, hidden=joined(hidden), cache=cache,
                        layer_hidden=None if layers is None else tuple(map(joined, layers)),
                        future_logits=None if future is None else joined(future))


def prefill(model, params, prompts, prompt_lengths, config: DecodeConfig, cache_size: int,
            rng, max_depth: int = 0, layer_hidden: bool = False):
  """The prefill call over the padded prompts and the first token.

  prompts: [B, P] int32 right-padded; prompt_lengths: [B]; cache_size: the target
  cache's slots (S plus a method's slack); layer_hidden: also return the per-block
  hidden states. Returns (the loop state with the first token committed, the
  prefill's ForwardOutput: hidden [B, P, D] at every position, logits [B, 1, V] at each
  row's last prompt position only, the one the first token is drawn from). The prompts
  go through the target config.prefill_chunk tokens per call (chunked_prefill).
  """
  batch = prompts.shape[0]
  out = chunked_prefill(model, params, prompts, prompt_lengths,
                        KVCache.empty(model.config, batch, cache_size), config.prefill_chunk,
                        layer_hidden)
  rng, key = jax.random.split(rng)
  first = sample(key, out.logits[:, 0], config.sampling, model.config.vocab_size)
  capacity = config.cache_capacity
  state = State(tokens=token_buffer(prompts, prompt_lengths, capacity), lengths=prompt_lengths,
                limits=row_limits(prompt_lengths, config.max_new_tokens, capacity),
                target_cache=out.cache.keep(prompt_lengths), done=jnp.zeros((batch,), bool),
                rng=rng, target_calls=jnp.ones((), jnp.int32),
                draft_calls=jnp.zeros((), jnp.int32),
                histogram=jnp.zeros((max_depth + 1,), jnp.int32))
  return commit_state(state, first[:, None], jnp.ones((batch,), jnp.int32), config.eos_ids), out


def autoregressive_round(model, params, config: DecodeConfig, state: State) -> State:
  """Plain decoding: feed each row's last token, sample the next (one target call)."""
  rows = jnp.arange(state.tokens.shape[0])
  last = state.tokens[rows, state.lengths - 1][:, None]                    # [B, 1]
  out = model.apply({'params': params}, last, (state.lengths - 1)[:, None],
                    cache=state.target_cache)
  rng, key = jax.random.split(state.rng)
  new = sample(key, out.logits[:, 0], config.sampling, model.config.vocab_size)  # [B]
  # Finished rows keep their cache length; the write they made lies past it.
  cache = out.cache.keep(jnp.where(state.done, state.target_cache.lengths, out.cache.lengths))
  state = state.replace(target_cache=cache, rng=rng, target_calls=state.target_calls + 1)
  return commit_state(state, new[:, None], jnp.ones_like(state.lengths), config.eos_ids)


def finish_round(state: State, accepted_tokens, num_accepted, next_token, target_cache,
                 eos_ids, **updates) -> State:
  """The end of every draft-and-verify round: commits each row's accepted tokens and
  the target's token, keeps [last, accepted] in the target cache, books the round in
  the histogram, and sets the method's own `updates` fields.

  accepted_tokens: [B, M] the accepted chain or tree path in order (entries past
  num_accepted [B] are ignored); next_token: [B] the replacement or bonus token.
  """
  batch = accepted_tokens.shape[0]
  candidates = jnp.concatenate([accepted_tokens, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  candidates = candidates.at[jnp.arange(batch), num_accepted].set(next_token)
  committed = commit_state(state, candidates, num_accepted + 1, eos_ids)
  return committed.replace(
      target_cache=target_cache.keep(state.lengths + num_accepted),
      target_calls=state.target_calls + 1,
      histogram=state.histogram.at[num_accepted].add((~state.done).astype(jnp.int32)),
      **updates)


def _verify_call(model, params, proposal, root, mask, cache, layer_hidden=False):
  """The round's one target call on the proposal's nodes, at the fixed width N = nodes.

  A round in which no row drafted anything (Proposal.num_drafted 0: prompt lookup without
  a match) still pays the full-width call. A lax.cond to a one-token call was tried and
  removed: an XLA conditional whose branches write the KV cache cannot update it in place
  (each branch returns a fresh buffer), so the compiled loop copied the whole cache in and
  out every round (6 cache-sized copies beyond AR's in the HLO), a cost that grows with the
  capacity, while the saving is at most 1 - 1 / c(N) of a no-draft round (c(5) = 1.1 on a
  CPU at batch 1). tests/test_driver_hlo.py checks that no chain method copies the cache."""
  positions = root[:, None] + proposal.depths
  return model.apply({'params': params}, proposal.tokens, positions, mask, cache,
                     **_layer_hidden(layer_hidden))


def count_ranks(histogram: jax.Array, ranks: jax.Array, path: jax.Array,
                num_accepted: jax.Array, done: jax.Array) -> jax.Array:
  """Adds a round's accepted drafted nodes to `histogram` [R] by their rank.

  ranks: [B, N] the proposal's node ranks (Proposal.ranks); path: [B, M + 1] accepted
  node indices, root first; num_accepted: [B]; done: [B] rows that no longer count.
  Under greedy verification the tree of budget b would have accepted, in this round,
  exactly the accepted nodes of rank < b (a kept set is prefix-closed: a child never
  outranks its parent), which is how launch/autotune.py prices every budget from one
  calibration run (EAGLE-2's reranking, Li et al. 2024, sec. 4.2)."""
  rows = jnp.arange(path.shape[0])[:, None]
  accepted = ranks[rows, path[:, 1:]]                                       # [B, M]
  live = (jnp.arange(path.shape[1] - 1)[None] < num_accepted[:, None]) & ~done[:, None]
  accepted = jnp.where(live & (accepted >= 0), accepted, histogram.shape[0])
  return histogram.at[accepted.reshape(-1)].add(1, mode='drop')


def speculative_round(model, params: Params, proposer: Proposer, config: DecodeConfig,
                      cache_size: int, state: State) -> State:
  """propose -> one target call under the proposal's mask -> processed log-probs ->
  accept -> move the accepted path's cache slots into sequence order -> commit. The
  target call is the proposer's own when `proposer.score` makes it (a self-drafting
  proposer that already ran the target's first blocks on the nodes), else the driver's."""
  keys = jax.random.split(state.rng, 3 if proposer.needs_key else 2)
  proposal, proposer_state, calls = proposer.propose(
      params, state.proposer, state, keys[1] if proposer.needs_key else None)
  rows, root = jnp.arange(state.tokens.shape[0]), state.lengths - 1
  tree = proposal.ancestors is not None
  mask = masks.tree_mask(proposal.ancestors, root, cache_size) if tree else None
  out = proposer.score(model, params, proposal, root[:, None] + proposal.depths,
                       state.target_cache, proposer_state)
  if out is None:
    out = _verify_call(model, params.target, proposal, root, mask, state.target_cache,
                       proposer.needs_layer_hidden)
  if config.sampling.greedy:  # The target's argmax per node; no [B, N, V] log-probs.
    path, num_accepted, next_token = verify.greedy_accept(proposal, greedy_ids(
        out.logits, model.config.vocab_size))
  else:
    target_logp = log_probs(out.logits, config.sampling, model.config.vocab_size)  # [B, N, V]
    path, num_accepted, next_token = verify.accept(
        keys[-1], proposal, target_logp, False, config.acceptance, config.chain_rule)
  cache = out.cache
  if tree:  # A chain's accepted tokens already sit in sequence order.
    cache = cache.move_slots(*trees.path_slots(root, path, num_accepted, cache_size))
  proposer_state = proposer.observe(params, proposer_state, state, out, path, num_accepted)
  if state.rank_histogram is not None and proposal.ranks is not None:
    state = state.replace(rank_histogram=count_ranks(
        state.rank_histogram, proposal.ranks, path, num_accepted, state.done))
  return finish_round(state, proposal.tokens[rows[:, None], path[:, 1:]], num_accepted,
                      next_token, cache, config.eos_ids, rng=keys[0], proposer=proposer_state,
                      draft_calls=state.draft_calls + calls)


@functools.partial(jax.jit, static_argnames=('model', 'config', 'drafter'))
def generate(model, params, prompts: jax.Array, prompt_lengths: jax.Array,
             config: DecodeConfig, rng: jax.Array, drafter=None,
             drafter_params=None) -> Output:
  """Decodes right-padded prompts with the method `config` describes; every method.

  model: the target, a Flax module called like models.Transformer (tokens, positions,
    attention_mask, cache) -> ForwardOutput; params: its parameters.
  prompts: [B, P] int32, right-padded; prompt_lengths: [B] int32 (>= 1, < S).
  config: a DecodeConfig (autoregressive.AutoregressiveConfig,
    speculative.SpeculativeConfig, medusa.MedusaConfig, eagle.EagleConfig, or any
    method registered in decoding/registry.py).
  drafter / drafter_params: the method's second module and its parameters (a draft
    model, Medusa heads, an EAGLE drafter), or None.
  Returns Output; speculative methods add draft_calls and accepted_histogram to stats.
  Raises ValueError (while tracing) when the method and its drafter do not fit, for a
  speculative method on a model with dynamic NTK rotary scaling (not lossless there), or
  for a block diffusion model (BD3-LM) under any method but block_diffusion (a config
  whose generate_own runs the whole generation, decoding/block_diffusion.py), or an
  any-subset AR model under any method but any_order / assd (decoding/any_subset.py).
  """
  own = config.generate_own(model, params, prompts, prompt_lengths, rng)
  if own is not None:
    return own
  if isinstance(model, BlockDiffusionLM):
    raise ValueError(f'This is a block diffusion model (BD3-LM, block size '
                     f'{model.block_size}): its denoiser predicts masked tokens, not the next '
                     'one; decode it with --method=block_diffusion.')
  if isinstance(model, AnySubsetLM):
    raise ValueError('This is an any-subset autoregressive model (AS-ARM): its predictions '
                     'come from query tokens, not the next-token head; decode it with '
                     '--method=any_order or --method=assd.')
  proposer = config.proposer(model, drafter)
  if proposer is not None and rope.depends_on_call(model.config):
    # Dynamic NTK rotary frequencies follow a call's largest position (as transformers
    # computes them), so scoring several positions in one call differs from one-token
    # steps past the original context: verification would not be lossless.
    raise ValueError('Speculative methods need a rotary embedding that does not depend on '
                     "the call's length; this model uses dynamic NTK scaling (rope_type="
                     "'dynamic'): decode it with --method=autoregressive.")
  slack = 0 if proposer is None else proposer.cache_slots
  cache_size = config.cache_capacity + slack
  state, out = prefill(model, params, prompts, prompt_lengths, config, cache_size, rng,
                       0 if proposer is None else proposer.max_depth,
                       proposer is not None and proposer.needs_layer_hidden)
  if proposer is None:
    round_ = functools.partial(autoregressive_round, model, params, config)
  else:
    both = Params(target=params, drafter=drafter_params)
    proposer_state, calls = proposer.start(both, out, prompts, prompt_lengths, cache_size)
    state = state.replace(proposer=proposer_state, draft_calls=calls)
    if proposer.ranked_nodes:
      state = state.replace(rank_histogram=jnp.zeros((proposer.ranked_nodes,), jnp.int32))
    round_ = functools.partial(speculative_round, model, both, proposer, config, cache_size)
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  stats = {} if proposer is None else {'draft_calls': state.draft_calls,
                                       'accepted_histogram': state.histogram}
  stats['prefill_calls'] = jnp.int32(prefill_calls(model.config, prompts.shape[1],
                                                   config.prefill_chunk))
  if state.rank_histogram is not None:
    stats['accepted_rank_histogram'] = state.rank_histogram
  finish, stop_id = finish_reasons(state.tokens, state.lengths, prompt_lengths,
                                   config.max_new_tokens, config.eos_ids)
  return Output(tokens=state.tokens, lengths=state.lengths, prompt_lengths=prompt_lengths,
                target_calls=state.target_calls, stats=stats, finish=finish, stop_id=stop_id)


def mean_accepted(histogram) -> float:
  """tau: tokens committed per row per target call in the decoding rounds (n + 1), from
  the accepted histogram [D + 1]; 1.0 when no round ran (every row ended at the prefill's
  token: one token for its one call), never the 0.0 an empty mean would give."""
  h = np.asarray(histogram, np.float64)
  if h.sum() <= 0:
    return 1.0
  return float((h * (np.arange(len(h)) + 1)).sum() / h.sum())
