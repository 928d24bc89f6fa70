"""The trunk's cost curves on the model at hand: one cached forward of T tokens, and the
autoregressive step versus the cache capacity.

    python -m launch.trunk_cost --workdir=WORKDIR [--dtype=bfloat16] [--batch_sizes=1,8]
        [--context=256] [--capacity=512] [--max_T=64] [--ar_capacities=128,512,2048]
        [--json=out.json]

`forward_cost` and `ar_step_cost` are the importable API (launch.bench may call them):
they take a Flax model and its parameters and import nothing from the other launch
modules but the standard-library timers (launch.timing). Wall-clock figures on a shared machine are noisy: read ratios measured in one
run, each the median of several repeats.
"""
import functools
import json
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from launch import timing


def _median_seconds(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of a JAX fn, after one untimed call."""
  return timing.median_seconds(lambda: jax.block_until_ready(fn()), repeats, warmup=True)[0]


def forward_cost(model, params, batch: int, context: int, capacity: int,
                 lengths_T: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 repeats: int = 5) -> dict:
  """Wall time of one cached forward of T new tokens (a verify call of T tokens).

  model: a models.Transformer (or a module called like it); params: its parameters.
  batch: rows B; context: tokens already in every row's cache (its lengths); capacity:
  the cache's slots S (>= context + max(lengths_T)); lengths_T: the T values.
  The cache is donated to each call and taken back (as a decoding loop updates it in
  place), so the figure is the forward alone.
  Returns {'batch', 'context', 'capacity', 'seconds': {T: median seconds per call},
  'relative': {T: seconds / seconds at the first T}}.
  Raises ValueError when a call would not fit the capacity.
  """
  from models import KVCache
  if context + max(lengths_T) > capacity:
    raise ValueError(f'context {context} + T {max(lengths_T)} exceeds capacity {capacity}.')
  config = model.config
  state = {'cache': KVCache.empty(config, batch, capacity).keep(
      jnp.full((batch,), context, jnp.int32))}

  # The cache is donated and returned (its lengths kept at `context`), as inside a
  # decoding loop, where it is updated in place: a non-donated cache would add a copy
  # of the whole cache to every call.
  @functools.partial(jax.jit, donate_argnums=1)
  def call(params, cache, tokens, positions):
    out = model.apply({'params': params}, tokens, positions, cache=cache)
    return out.logits, out.cache.keep(cache.lengths)

  def step(tokens, positions):
    logits, state['cache'] = call(params, state['cache'], tokens, positions)
    return logits

  seconds = {}
  for length in lengths_T:
    tokens = jnp.ones((batch, length), jnp.int32)
    positions = jnp.broadcast_to(context + jnp.arange(length), (batch, length))
    seconds[length] = _median_seconds(lambda: step(tokens, positions), repeats)
  first = seconds[lengths_T[0]]
  return dict(batch=batch, context=context, capacity=capacity, seconds=seconds,
              relative={t: s / first for t, s in seconds.items()})


def ar_step_cost(model, params, batch: int, capacities: Sequence[int], prompt_len: int = 22,
                 new_tokens: int = 48, repeats: int = 3) -> dict:
  """Per-step time of plain autoregressive decoding (decoding.driver.generate, greedy)
  at each cache capacity, the same prompt and new tokens: the step should follow the
  context, not the capacity.

  Returns {capacity: {'step_ms': (run - prefill-only run) / new_tokens in ms,
  'compile_s': first call minus a warm call}}.
  """
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


def main(argv):
  del argv
  from absl import flags
  from launch import common
  from training import checkpoints
  f = flags.FLAGS
  common.setup_logging()
  with common.user_errors_as_messages():
    restored = checkpoints.restore_model(f.workdir)
    if f.dtype:
      restored = checkpoints.with_dtype(restored, f.dtype)
    from launch import generation
    model = restored.model
    layout = generation.effective_layout(f.weight_layout, jax.device_count())
    # The decoding layout has two orientations (rows: one-token calls; columns: calls of
    # several tokens); both curves are measured, the AR step in rows.
    orientations = ('rows', 'columns') if layout == 'per_block' else ('',)
    params = {o: generation.measured_params(restored.params, f.weight_layout, o or 'rows')
              for o in orientations}
    report = {'dtype': model.config.dtype, 'forward': [], 'ar_step': {},
              'weight_layout': layout}
    lengths_T = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= f.max_T]
    for batch in map(int, f.batch_sizes.split(',')):
      for orientation in orientations:
        cost = forward_cost(model, params[orientation], batch, f.context, f.capacity,
                            lengths_T)
        report['forward'].append(dict(cost, orientation=orientation or None))
        print(f'forward B={batch} context={f.context} capacity={f.capacity}'
              + (f' ({orientation})' if orientation else '') + ': '
              + ' '.join(f'T={t}:{1e3 * s:.1f}ms({cost["relative"][t]:.2f})'
                         for t, s in cost['seconds'].items()), flush=True)
    if f.ar_capacities:
      for batch in map(int, f.batch_sizes.split(',')):
        steps = ar_step_cost(model, params[orientations[0]], batch,
                             [int(c) for c in f.ar_capacities.split(',')])
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
