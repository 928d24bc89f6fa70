"""The trunk's cost curves on the model at hand: one cached forward of T tokens, and the
autoregressive step versus the cache capacity.

    python -m launch.trunk_cost --workdir=WORKDIR [--dtype=bfloat16] [--batch_sizes=1,8]
        [--context=256] [--capacity=512] [--max_T=64] [--ar_capacities=128,512,2048]
        [--json=out.json]

`forward_cost` and `ar_step_cost` are the importable API: they take a Flax model and its
parameters and import nothing from the other launch modules but the standard-library
timers (launch.timing). `forward_cost` is also the timing behind launch.bench's
verify-cost curve (launch.benchmarking.measure_verify_cost), so this command and the bench
measure one call the same way. Wall-clock figures on a shared machine are noisy: read
ratios measured in one run, each the median of several repeats.
"""
import functools
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from launch import timing


def _verify_program(model):
  """jit: `steps` cached forward calls of T tokens [B, T] written at slots `start` + t, in
  one lax.fori_loop (as decoding runs them: no host round trip, the cache carried). Each
  call's tokens are the previous call's greedy choices, so no call can be hoisted out of
  the loop. The write slots are explicit, so the cache keeps its length (the context).
  The cache is donated: pass the returned one to the next call."""
  vocab = model.config.vocab_size

  @functools.partial(jax.jit, donate_argnums=1)
  def run(params, cache, tokens, start, steps):
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None]

    def body(_, carry):
      cache, tokens = carry
      out = model.apply({'params': params}, tokens, positions, cache=cache,
                        write_slots=positions)
      return out.cache, jnp.argmax(out.logits[..., :vocab], -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens))

  return run


@functools.lru_cache
def _fill_program(model, capacity: int):
  """jit: a cache of `capacity` slots filled by one prefill call over `tokens` [B, C]."""
  from models import KVCache

  @jax.jit
  def fill(params, tokens):
    batch, context = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(context), tokens.shape)
    cache = KVCache.empty(model.config, batch, capacity)
    return model.apply({'params': params}, tokens, positions, cache=cache).cache

  return fill


def forward_cost(model, params, batch: int, context: int, capacity: int | None = None,
                 lengths_T: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), seconds: float = 0.3,
                 repeats: int = 3, seed: int = 0) -> dict:
  """Wall time of ONE cached forward call of T new tokens (a chain verify of T - 1 drafted
  tokens: the target's call in a speculative round; the "cost coefficient" of Leviathan
  et al. 2023, Sec. 3.4, seen from the target's side), for each T in `lengths_T`. The one
  timing loop of the codebase: launch.benchmarking.measure_verify_cost (the curve
  `--num_draft=auto` reads) calls it.

  model: a models.Transformer (or a module called like it). params: its parameters, or a
  function T -> the parameters a call of T tokens reads (the decoding layout keeps two
  orientations, launch.generation.decode_orientation). batch: rows B; context: tokens
  already in every row's cache (random tokens, filled by one prefill call; the cost does
  not depend on their values); capacity: the cache's slots S (None: context + max T).

  Each T is its own compiled program (`_verify_program`): after a compiling run, `steps`
  calls run in one lax.fori_loop, with steps chosen so a run lasts about `seconds`; the
  median of `repeats` runs divided by steps is the call's time. The cache is donated to
  each run and taken back, as the decoding loop updates it in place: a run that does not
  own its cache copies all of it first, which at batch 8 and a 1257-slot SmolLM2 cache
  (460 MB) tripled the one-token call (300 ms against a 92 ms decode step) and flattened
  the curve (T = 8 at 1.4x T = 1; with the cache donated, 1.8x).

  Returns {'batch', 'context', 'capacity', 'tokens': [T ascending], 'ms': [ms per call],
  'relative': [ms / ms at the smallest T]}.
  Raises ValueError when context < 1 or context + max T exceeds the capacity.
  """
  tokens = sorted(set(int(t) for t in lengths_T))
  if batch < 1 or not tokens or tokens[0] < 1:
    raise ValueError(f'The forward-cost curve needs batch >= 1 and token counts T >= 1; got '
                     f'batch {batch}, T {tokens}.')
  capacity = capacity or context + tokens[-1]
  if context < 1 or context + tokens[-1] > capacity:
    raise ValueError(f'The forward-cost curve needs context ({context}) >= 1 with context + '
                     f'max T ({tokens[-1]}) <= capacity ({capacity}).')
  params_of = params if callable(params) else lambda t: params
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  state = {'cache': _fill_program(model, capacity)(
      params_of(max(tokens)), jnp.asarray(rng.integers(0, vocab, (batch, context)), jnp.int32))}
  run = _verify_program(model)
  start = jnp.full((batch,), context, jnp.int32)

  def call(call_params, ids, steps):
    state['cache'], chosen = run(call_params, state['cache'], ids, start, steps)
    return jax.block_until_ready(chosen)

  ms = []
  for t in tokens:
    ids = jnp.asarray(rng.integers(0, vocab, (batch, t)), jnp.int32)
    call_params = params_of(t)
    call(call_params, ids, 1)  # compiles
    one, _ = timing.median_seconds(lambda: call(call_params, ids, 1), 1)
    steps = int(min(max(seconds / max(one, 1e-6), 1), 1000))
    run_s, _ = timing.median_seconds(lambda: call(call_params, ids, steps), repeats)
    ms.append(1e3 * run_s / steps)
  return dict(batch=batch, context=context, capacity=capacity, tokens=tokens, ms=ms,
              relative=[m / ms[0] for m in ms])


AR_PROMPT, AR_NEW_TOKENS = 22, 48   # ar_step_cost's default prompt and new tokens


def ar_step_cost(model, params, batch: int, capacities: Sequence[int],
                 prompt_len: int = AR_PROMPT, new_tokens: int = AR_NEW_TOKENS,
                 repeats: int = 3) -> dict:
  """Per-step time of plain autoregressive decoding (decoding.driver.generate, greedy)
  at each cache capacity, the same prompt and new tokens: the step should follow the
  context, not the capacity.

  Returns {capacity: {'step_ms': (run - prefill-only run) / new_tokens in ms,
  'compile_s': first call minus a warm call}}.
  Raises ValueError when a capacity is below prompt_len + new_tokens or batch < 1.
  """
  if batch < 1:
    raise ValueError(f'The AR step curve needs batch >= 1; got {batch}.')
  if min(capacities) < prompt_len + new_tokens:
    raise ValueError(f'The AR step curve needs capacities >= prompt_len + new_tokens '
                     f'({prompt_len} + {new_tokens}); got {min(capacities)}.')
  from decoding import autoregressive, driver
  vocab = model.config.vocab_size
  prompts = jnp.asarray(np.random.RandomState(0).randint(3, vocab, (batch, prompt_len)),
                        jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  out = {}
  for capacity in capacities:
    def run(n):
      cfg = autoregressive.AutoregressiveConfig(n, capacity, eos_ids=(-1,))
      return driver.generate(model, params, prompts, lengths, cfg, jax.random.PRNGKey(0)).tokens
    t0 = time.perf_counter()
    jax.block_until_ready(run(new_tokens))
    first = time.perf_counter() - t0
    full, _, decode, _ = timing.paired_seconds(
        lambda: jax.block_until_ready(run(new_tokens)),
        lambda: jax.block_until_ready(run(1)), repeats, warmup=True)
    out[capacity] = dict(step_ms=1e3 * decode / (new_tokens - 1),
                         compile_s=first - full)
  return out


def _int_list(flag: str, text: str, minimum: int) -> list[int]:
  """Comma-separated integers >= minimum ('' -> []). Raises ValueError naming the flag."""
  try:
    values = [int(v) for v in text.split(',')] if text.strip() else []
  except ValueError:
    raise ValueError(f'{flag} takes comma-separated integers; got {text!r}.') from None
  if any(v < minimum for v in values):
    raise ValueError(f'{flag} values must be >= {minimum}; got {text}.')
  return values


def main(argv):
  del argv
  from absl import flags
  from launch import common
  from training import checkpoints
  f = flags.FLAGS
  common.setup_logging()
  with common.user_errors_as_messages():
    # Every flag is checked before anything is measured (a bad one would otherwise surface
    # after minutes of timing, or lose the figures at the end).
    batch_sizes = _int_list('--batch_sizes', f.batch_sizes, 1)
    ar_capacities = _int_list('--ar_capacities', f.ar_capacities, AR_PROMPT + AR_NEW_TOKENS)
    if f.max_T < 1:
      raise ValueError(f'--max_T must be >= 1; got {f.max_T}.')
    lengths_T = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= f.max_T]
    if f.context < 1 or f.capacity < f.context + lengths_T[-1]:
      raise ValueError(f'--capacity ({f.capacity}) must hold --context ({f.context} >= 1) plus '
                       f'the largest T ({lengths_T[-1]}).')
    if f.json and not os.path.isdir(os.path.dirname(os.path.abspath(f.json))):
      raise ValueError(f'--json: no directory for {f.json}.')
    restored = checkpoints.restore_model(f.workdir)
    if f.dtype:
      restored = checkpoints.with_dtype(restored, f.dtype)
    from launch import generation
    model = restored.model
    layout = generation.default_mesh_layout(f.weight_layout)
    # The decoding layout has two orientations (rows: one-token calls; columns: calls of
    # several tokens); both curves are measured, the AR step in rows.
    orientations = ('rows', 'columns') if layout == 'per_block' else ('',)
    params = {o: generation.measured_params(restored.params, f.weight_layout, o or 'rows')
              for o in orientations}
    report = {'dtype': model.config.dtype, 'forward': [], 'ar_step': {},
              'weight_layout': layout}
    for batch in batch_sizes:
      for orientation in orientations:
        cost = forward_cost(model, params[orientation], batch, f.context, f.capacity,
                            lengths_T)
        report['forward'].append(dict(cost, orientation=orientation or None))
        print(f'forward B={batch} context={f.context} capacity={cost["capacity"]}'
              + (f' ({orientation})' if orientation else '') + ': '
              + ' '.join(f'T={t}:{ms:.1f}ms({rel:.2f})' for t, ms, rel
                         in zip(cost['tokens'], cost['ms'], cost['relative'])), flush=True)
    if ar_capacities:
      for batch in batch_sizes:
        steps = ar_step_cost(model, params[orientations[0]], batch, ar_capacities)
        report['ar_step'][batch] = steps
        print(f'AR step B={batch}: ' + ' '.join(
            f'S={c}:{v["step_ms"]:.1f}ms(compile {v["compile_s"]:.1f}s)'
            for c, v in steps.items()), flush=True)
    if f.json:
      with open(f.json, 'w') as fh:
        json.dump(report, fh, indent=1, default=str)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'A workdir with a checkpoint (launch.convert / train).')
  flags.DEFINE_string('dtype', '', 'Decode in this dtype (float32 | bfloat16); default: '
                      "the checkpoint's.")
  flags.DEFINE_string('batch_sizes', '1,8', 'Comma-separated batch sizes.')
  flags.DEFINE_integer('context', 256, 'Tokens already in the cache for the forward curve.')
  flags.DEFINE_integer('capacity', 512, 'Cache capacity for the forward curve.')
  flags.DEFINE_integer('max_T', 64, 'Largest T of the forward curve.')
  flags.DEFINE_string('ar_capacities', '128,512,2048', 'Capacities of the AR step curve '
                      '("" to skip).')
  flags.DEFINE_string('weight_layout', 'auto', 'The block weights\' layout: auto | stacked | '
                      'per_block (launch/generation.decoding_params).')
  flags.DEFINE_string('json', '', 'Also write the figures to this JSON file.')
  flags.mark_flag_as_required('workdir')
  app.run(main)
