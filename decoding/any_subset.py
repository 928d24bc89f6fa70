"""Decoding an any-subset autoregressive model (AS-ARM; Guo and Ermon 2025, "Reviving
Any-Subset Autoregressive Models with Principled Parallel Sampling and Speculative
Decoding"): sequential any-order decoding and any-subset speculative decoding (ASSD),
for continuation (left to right after a prompt) and infilling (any masked positions
given the rest), batched with ragged rows, each one jit-compiled `lax.while_loop`.

Axis letters: B batch, S context (positions = cache slots of the content stream), P
padded prompt / template length, k drafted tokens, V padded vocabulary ([MASK] incl.).

The task of a row: a known set of positions (the prompt, or the unmasked tokens of an
infilling template; all attend to each other, as in training) and an order u_1, u_2, ...
of target positions (continuation: the positions after the prompt, up to
max_new_tokens; infilling: the template's [MASK] positions, left to right, the order
the model trained in: training/objectives/any_subset.draw_ranks 'sorted').
Bookkeeping is in two spaces:
  order space     `ordered` [B, S] the committed tokens in decoding order (the known set
                  first), a left-aligned buffer exactly like the driver's, so the
                  driver's `commit` applies the stop rule (EOS inside an accepted block,
                  the row's limit) unchanged; `order` [B, S] maps it to positions;
  position space  the KV cache: a token's content stream is written at slot = its
                  position, non-contiguously; `visible` [B, S] is the per-slot validity
                  (which slots hold kept content). Query-stream tokens ([MASK] at a
                  requested position) go to scratch slots S, S + 1, ... and are never
                  kept. models/masks.any_order_slot_mask builds every call's mask.

Each round starts with the last committed token's content not yet in the cache (it
was sampled from a query); the round's first call writes it.

  sequential (`AnyOrderConfig`): one call per token: [that content, a query at the next
      target position] -> sample from the query's distribution -> commit.
  ASSD (`ASSDConfig`, the paper's Algorithm 1; k = num_draft):
      draft   one call: [that content, queries at the next k target positions]; draw
              each draft independently from its marginal q_i = p(x_{u_i} | committed);
      verify  one call: [the k drafts' content, causal in the order, queries at the k + 1
              target positions]: query i gives p_i = p(x_{u_i} | committed, drafts < i);
      accept  the token-level rule of decoding/verify.py (chain_accept): draft i kept
              with probability min(1, p_i / q_i), the first rejected one replaced from
              norm(max(p_i - q_i, 0)). p_1 = q_1 (the same conditional), so the first
              draft is always kept (the verifier is handed q_1 as p_1: they differ only
              by rounding between the two calls) and each round commits >= 2 tokens for
              2 calls when k >= 2: never more calls per token than sequential decoding.
      bonus   when all k drafts are kept, query k + 1 of the verify call is the exact
              conditional of the next target: a (k+1)-th token is drawn from it. The
              reference code stops at k; the extra query costs one more row in the
              verify call and keeps the rule exact (the chain rule's bonus token).
      A row with one target left needs no verification (its one draft is a sample of
      the sequential conditional): the verify call is skipped when no row needs it
      (the reference code's same shortcut at the last token).
The committed tokens are distributed exactly as sequential any-order sampling in the
same order (the speculative sampling theorem; G-tests in tests/test_any_subset.py), and
under greedy decoding they are the same tokens.

NFE counts, per row, the model calls that row needed after the prefill.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver, verify
from decoding.proposal import Proposal
from decoding.sampling import log_probs, sample
from models import AnySubsetLM, KVCache, masks


def check_templates(prompts, prompt_lengths, mask_id: int, capacity: int) -> None:
  """Clear errors for infilling templates, on the host before anything compiles.

  prompts: [B, P] right-padded token ids with mask_id at the positions to fill;
  prompt_lengths: [B]; capacity: the context (positions). Raises ValueError naming the
  template: longer than the context, no [MASK] to fill, nothing known, an id outside
  the vocabulary [0, mask_id].
  """
  prompts, lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  for row, n in enumerate(lengths.tolist()):
    ids = prompts[row, :n]
    if n > capacity:
      raise ValueError(f'Infilling template {row} has {n} tokens (its spans included), more '
                       f'than the context ({capacity} tokens).')
    if not np.any(ids == mask_id):
      raise ValueError(f'Infilling template {row} has no span to fill (no mask marker).')
    if np.all(ids == mask_id):
      raise ValueError(f'Infilling template {row} is all spans: give some known text.')
    if ids.min() < 0 or ids.max() > mask_id:
      bad = int(ids[(ids < 0) | (ids > mask_id)][0])
      raise ValueError(f'Infilling template {row} holds token id {bad}, outside the '
                       f'vocabulary [0, {mask_id}).')


def check_model(model) -> None:
  """Raises ValueError unless `model` is an AS-ARM (models.AnySubsetLM)."""
  if not isinstance(model, AnySubsetLM):
    raise ValueError('--method=any_order / assd decode an any-subset autoregressive model '
                     '(trained with configs/asarm.py); this workdir holds a '
                     f'{type(model).__name__}.')


@dataclasses.dataclass(frozen=True)
class AnyOrderConfig(driver.DecodeConfig):
  """Sequential any-order decoding: the driver's settings plus infill (False: continue
  each prompt left to right for max_new_tokens, stopping at an EOS id; True: each prompt
  is a template whose [MASK] ids (model.mask_id) are the positions to fill, left to
  right; every one is filled and EOS ids do not stop a row)."""
  infill: bool = False

  @property
  def num_draft(self) -> int:
    return 0

  def generate_own(self, model, params, prompts, prompt_lengths, rng):
    return generate(model, params, prompts, prompt_lengths, self, rng)


@dataclasses.dataclass(frozen=True)
class ASSDConfig(AnyOrderConfig):
  """Any-subset speculative decoding with k = draft tokens per round (>= 1)."""
  draft: int = 4

  def __post_init__(self):
    if not isinstance(self.draft, int) or self.draft < 1:
      raise ValueError(f'ASSD drafts k >= 1 tokens per round (--num_draft); got {self.draft}.')

  @property
  def num_draft(self) -> int:
    return self.draft


@flax.struct.dataclass
class State:
  ordered: jax.Array      # [B, S] committed tokens in decoding order (known set first)
  lengths: jax.Array      # [B] committed tokens
  limits: jax.Array       # [B] known + target count: the row stops there
  done: jax.Array         # [B] bool
  order: jax.Array        # [B, S] the position of the i-th token of the order
  sequence: jax.Array     # [B, S] tokens by position ([MASK] where not decoded)
  visible: jax.Array      # [B, S] bool: the cache slot holds kept content
  pending: jax.Array      # [B] bool: the last committed token's content is not cached
  cache: KVCache
  rng: jax.Array
  calls: jax.Array        # [] batched model calls, prefill included
  nfe: jax.Array          # [B] calls each row needed, prefill excluded
  histogram: jax.Array    # [k + 1] row-rounds by drafts kept (ASSD)
  num_known: jax.Array    # [B] the known set's size
  rounds: jax.Array       # [] loop iterations (ASSD: draft calls)


def _task(model, prompts, prompt_lengths, config: AnyOrderConfig, size: int):
  """(tokens by position [B, S], known [B, S] bool, order [B, S], known count [B], limits
  [B]) of each row's task (see the module docstring)."""
  batch, width = prompts.shape
  pos = jnp.arange(size)[None]
  template = jnp.zeros((batch, size), jnp.int32).at[:, :width].set(prompts)
  inside = pos < prompt_lengths[:, None]
  if config.infill:
    target = inside & (template == model.mask_id)
    known = inside & ~target
  else:
    known = inside
    limit = jnp.minimum(prompt_lengths + min(config.max_new_tokens, size), size)
    target = ~inside & (pos < limit[:, None])
  key = jnp.where(known, pos, jnp.where(target, size + pos, 2 * size + pos))
  order = jnp.argsort(key, axis=1).astype(jnp.int32)
  num_known = jnp.sum(known, axis=1).astype(jnp.int32)
  limits = num_known + jnp.sum(target, axis=1).astype(jnp.int32)
  tokens = jnp.where(known, template, model.mask_id)
  return tokens, known, order, num_known, limits


def _call(model, params, tokens, positions, write_slots, within, visible, cache):
  """One cached forward under any_order_slot_mask -> (prediction logits [B, T, V], cache)."""
  mask = masks.any_order_slot_mask(
      jnp.pad(visible, ((0, 0), (0, cache.capacity - visible.shape[1]))), write_slots, within)
  out = model.apply({'params': params}, tokens, positions, mask, cache, write_slots=write_slots)
  return model.prediction_logits(out.logits), out.cache


def start_state(model, params, prompts, prompt_lengths, config: AnyOrderConfig, rng) -> State:
  """The prefill: the known set's content, all of it attending to all of it, written at
  slot = position (one call). prompts: [B, P] right-padded (templates with [MASK] ids
  when config.infill); prompt_lengths: [B]."""
  check_model(model)
  size, k = config.cache_capacity, config.num_draft
  batch, width = prompts.shape
  tokens, known, order, num_known, limits = _task(model, prompts, prompt_lengths, config, size)
  cache = KVCache.empty(model.config, batch, size + k + 1)
  positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
  drop = cache.capacity
  slots = jnp.where(known[:, :width], positions, drop)
  within = jnp.broadcast_to(known[:, None, :width], (batch, width, width))
  _, cache = _call(model, params, tokens[:, :width], positions, slots, within,
                   jnp.zeros((batch, size), bool), cache)
  ordered = jnp.where(jnp.arange(size)[None] < num_known[:, None],
                      jnp.take_along_axis(tokens, order, axis=1), 0)
  return State(ordered=ordered, lengths=num_known, limits=limits, done=num_known >= limits,
               order=order, sequence=tokens, visible=known,
               pending=jnp.zeros((batch,), bool), cache=cache, rng=rng,
               calls=jnp.ones((), jnp.int32), nfe=jnp.zeros((batch,), jnp.int32),
               histogram=jnp.zeros((max(k, 1) + 1,), jnp.int32), num_known=num_known,
               rounds=jnp.zeros((), jnp.int32))


def _positions(state: State, offsets, size: int):
  """(positions [B, n] of order entries lengths + offsets, clipped into the context;
  real [B, n] bool: entries below the row's limit)."""
  index = state.lengths[:, None] + offsets[None]
  real = index < state.limits[:, None]
  pos = jnp.take_along_axis(state.order, jnp.minimum(index, size - 1), axis=1)
  return jnp.where(real, pos, 0), real


def _first_call(model, params, config, state: State, num_queries: int):
  """[the last committed token's content, queries at the next num_queries targets]
  -> (logits of the queries [B, n, V], the cache, the state with that content kept)."""
  size = config.cache_capacity
  batch = state.ordered.shape[0]
  rows = jnp.arange(batch)
  drop = state.cache.capacity
  last = state.ordered[rows, jnp.maximum(state.lengths - 1, 0)]
  last_pos = state.order[rows, jnp.maximum(state.lengths - 1, 0)]
  write_last = state.pending & ~state.done
  query_pos, _ = _positions(state, jnp.arange(num_queries), size)
  tokens = jnp.concatenate([last[:, None], jnp.full((batch, num_queries), model.mask_id)], 1)
  positions = jnp.concatenate([last_pos[:, None], query_pos], axis=1)
  slots = jnp.concatenate([jnp.where(write_last, last_pos, drop)[:, None],
                           jnp.broadcast_to(size + jnp.arange(num_queries),
                                            (batch, num_queries))], axis=1)
  n = num_queries + 1
  within = jnp.eye(n, dtype=bool).at[:, 0].set(True)       # everyone sees that content
  logits, cache = _call(model, params, tokens, positions, slots, within, state.visible,
                        state.cache)
  visible = state.visible.at[rows, last_pos].max(write_last)
  return logits[:, 1:], cache, state.replace(cache=cache, visible=visible,
                                             pending=state.pending & ~write_last)


def _commit(config, state: State, candidates, count, positions_of) -> State:
  """driver.commit in order space, then the committed tokens into position space."""
  eos = () if config.infill else config.eos_ids
  start = state.lengths
  ordered, lengths, done = driver.commit(state.ordered, state.lengths, state.limits,
                                         state.done, candidates, count, eos)
  width = candidates.shape[1]
  index = jnp.arange(width)[None]
  written = index < (lengths - start)[:, None]
  rows = jnp.arange(candidates.shape[0])[:, None]
  slots = jnp.where(written, positions_of, state.sequence.shape[1])
  sequence = state.sequence.at[rows, slots].set(candidates, mode='drop')
  return state.replace(ordered=ordered, lengths=lengths, done=done, sequence=sequence,
                       pending=state.pending | (lengths > start))


def _sequential_round(model, params, config: AnyOrderConfig, state: State) -> State:
  active = ~state.done
  logits, _, state = _first_call(model, params, config, state, 1)
  rng, key = jax.random.split(state.rng)
  token = sample(key, logits[:, 0], config.sampling, model.mask_id)          # [B]
  positions, _ = _positions(state, jnp.arange(1), config.cache_capacity)
  state = state.replace(rng=rng, calls=state.calls + 1, nfe=state.nfe + active)
  return _commit(config, state, token[:, None], jnp.ones_like(state.lengths), positions)


def _assd_round(model, params, config: ASSDConfig, state: State) -> State:
  k, size = config.draft, config.cache_capacity
  batch = state.ordered.shape[0]
  rows = jnp.arange(batch)
  active = ~state.done
  rng, draft_key, accept_key = jax.random.split(state.rng, 3)
  logits, _, state = _first_call(model, params, config, state, k)
  vocab = model.mask_id
  draft_logp = log_probs(logits, config.sampling, vocab)                      # [B, k, V]
  drafts = sample(draft_key, logits, config.sampling, vocab)                  # [B, k]
  num_drafted = jnp.clip(state.limits - state.lengths, 0, k).astype(jnp.int32)
  draft_pos, real = _positions(state, jnp.arange(k), size)
  query_pos, _ = _positions(state, jnp.arange(k + 1), size)
  drop = state.cache.capacity

  def verify_call(cache):
    tokens = jnp.concatenate([drafts, jnp.full((batch, k + 1), model.mask_id)], axis=1)
    positions = jnp.concatenate([draft_pos, query_pos], axis=1)
    slots = jnp.concatenate([jnp.where(real & active[:, None], draft_pos, drop),
                             jnp.broadcast_to(size + jnp.arange(k + 1), (batch, k + 1))], 1)
    i = jnp.arange(k)
    content = i[None, :] <= i[:, None]                                        # causal
    query = jnp.arange(k + 1)[:, None] > i[None, :]                           # drafts < i
    within = jnp.concatenate([
        jnp.concatenate([content, jnp.zeros((k, k + 1), bool)], axis=1),
        jnp.concatenate([query, jnp.eye(k + 1, dtype=bool)], axis=1)], axis=0)
    logits, cache = _call(model, params, tokens, positions, slots, within, state.visible,
                          cache)
    return log_probs(logits[:, k:], config.sampling, vocab), cache

  needs = active & (state.limits - state.lengths >= 2)   # drafts to verify, or a bonus
  target_logp, cache = jax.lax.cond(
      jnp.any(needs), verify_call,
      lambda cache: (jnp.concatenate([draft_logp, draft_logp[:, -1:]], axis=1), cache),
      state.cache)
  # p_1 and q_1 are the same conditional computed by two calls: the verifier gets q_1.
  target_logp = target_logp.at[:, 0].set(draft_logp[:, 0])
  proposal = Proposal.chain(state.ordered[rows, state.lengths - 1], drafts,
                            jnp.concatenate([draft_logp, draft_logp[:, -1:]], axis=1),
                            num_drafted)
  _, num_accepted, next_token = verify.accept(accept_key, proposal, target_logp,
                                              config.sampling.greedy, None, 'token')
  # A row with one target left: its draft is kept (num_accepted = 1) and the bonus lies
  # past its limit, so commit cuts it.
  candidates = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  candidates = candidates.at[rows, num_accepted].set(next_token)
  start = state.lengths
  state = state.replace(cache=cache, rng=rng, calls=state.calls + 1 + jnp.any(needs),
                        nfe=state.nfe + active + needs,
                        rounds=state.rounds + 1,
                        histogram=state.histogram.at[num_accepted].add(active.astype(jnp.int32)))
  state = _commit(config, state, candidates, num_accepted + 1, query_pos)
  # The kept drafts' content is in the cache (written causally in the order); the last
  # committed token (the replacement or bonus) is pending.
  kept = (jnp.arange(k)[None] < jnp.minimum(num_accepted, state.lengths - start)[:, None])
  slots = jnp.where(kept & needs[:, None], draft_pos, size)
  visible = state.visible.at[rows[:, None], slots].set(True, mode='drop')
  return state.replace(visible=visible)


@functools.partial(jax.jit, static_argnames=('model', 'config'))
def generate(model, params, prompts: jax.Array, prompt_lengths: jax.Array,
             config: AnyOrderConfig, rng: jax.Array) -> driver.Output:
  """Sequential any-order decoding (AnyOrderConfig) or ASSD (ASSDConfig) with an AS-ARM.

  model: models.AnySubsetLM; params: its parameters. prompts: [B, P] int32 right-padded
  (P <= config.cache_capacity = S); prompt_lengths: [B] (>= 1). With config.infill the
  prompts are templates whose [MASK] ids (model.mask_id) are filled (each template needs
  a known token and a [MASK]; launch/generation.infill_template checks it on the host).
  Returns driver.Output: tokens [B, S] the committed tokens in decoding order (known
  set first; for continuation that is the sequence itself), lengths [B], prompt_lengths
  [B] the known counts (so completions() are the decoded tokens in order), target_calls
  (batched calls, prefill included); stats: sequence [B, S] the tokens by position
  ([MASK] where nothing was decoded), nfe [B] calls each row needed after the prefill;
  ASSD adds accepted_histogram [k + 1] (row-rounds by drafts kept, >= 1: the first one
  always is; driver.mean_accepted reads it as tokens per round) and draft_calls (rounds).
  Raises ValueError (on the host, while tracing) for a model that is not an AS-ARM.
  Source: Guo and Ermon 2025, Algorithm 1 (ASSD); sequential decoding is their baseline.
  """
  state = start_state(model, params, prompts, prompt_lengths, config, rng)
  body = (functools.partial(_assd_round, model, params, config) if config.num_draft
          else functools.partial(_sequential_round, model, params, config))
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
  num_known = state.num_known
  if config.infill:
    finish = jnp.full_like(state.lengths, driver.FINISH_LENGTH)
    stop_id = jnp.full_like(state.lengths, -1)
  else:
    finish, stop_id = driver.finish_reasons(state.ordered, state.lengths, num_known,
                                            config.max_new_tokens, config.eos_ids)
  stats = {'sequence': state.sequence, 'nfe': state.nfe}
  if config.num_draft:
    stats.update(accepted_histogram=state.histogram,
                 draft_calls=state.rounds)
  return driver.Output(tokens=state.ordered, lengths=state.lengths, prompt_lengths=num_known,
                       target_calls=state.calls, stats=stats, finish=finish, stop_id=stop_id)
