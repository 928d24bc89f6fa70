"""Wall-clock timing of benchmark runs: the one home of the median-of-repeats and paired
(full run, prefill-only run) timers that launch.generation, launch.baselines and
launch.trunk_cost use. Standard library only, so any launch module may import it.

Each timer takes zero-argument callables that return only when their work is done (wrap
a JAX call in jax.block_until_ready). Wall-clock figures on a shared machine are noisy:
read ratios measured in one run.
"""
import statistics
import time


def median_seconds(fn, repeats: int, warmup: bool = False):
  """(median wall seconds of `repeats` >= 1 calls of fn, the last call's output), after
  one untimed call if `warmup`: a compiled program's first execution pays one-time costs
  (buffer allocation, first touch of the cache's pages) that made single-repeat
  benchmark rows of the same program differ by up to 40%."""
  if warmup:
    fn()
  times, out = [], None
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def paired_seconds(full, prefill, repeats: int, warmup: bool = False):
  """(median seconds of `full`, median seconds of `prefill`, median of the per-repeat
  differences full - prefill, full's last output): the two run alternately `repeats` >= 1
  times (each once untimed first if `warmup`), and the decode time is the median of each
  pair's difference. On a long prompt the prefill is most of the run (3.4 s of 4.3 s for
  SmolLM2's 1200-token prompt and 64 new tokens), so a difference of two separately taken
  medians carried the machine's drift between them into the decode time (decode tok/s of
  one method on one prompt varied 2x between runs); a pair run back to back shares it."""
  if warmup:
    full()
    prefill()
  whole, first, out = [], [], None
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = full()
    t1 = time.perf_counter()
    prefill()
    whole.append(t1 - t0)
    first.append(time.perf_counter() - t1)
  return (statistics.median(whole), statistics.median(first),
          statistics.median(w - p for w, p in zip(whole, first)), out)
