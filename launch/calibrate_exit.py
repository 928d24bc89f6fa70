"""Calibrate CALM's exit threshold to a requested agreement with the full model:

  python -m launch.calibrate_exit --workdir=workdirs/early_exit_small --agreement=0.9 \
      [--confidence=softmax --exit_layers=2,4 --num_prompts=16 --delta=0.1]

CALM (Schuster et al. 2022, section 4.2) picks the threshold by Learn-then-Test: a
sequence of thresholds from the safest (1: never exit) down, each tested for "risk <=
epsilon" with a p-value from a concentration bound, stopping at the first that fails
(fixed-sequence testing); every threshold before it is valid with probability >= 1 - delta.
Here the risk of a prompt is 1 - its token agreement (the fraction of its new greedy
tokens equal to the full model's greedy token on the same prefix; launch.benchmarking.
token_agreement) and epsilon = 1 - the requested agreement:

  --delta=0 (default), the simpler empirical rule: the lowest threshold of the grid whose
    mean agreement on the calibration prompts is >= the request, walking down the grid and
    stopping at the first that misses it. No guarantee: it is checked on held-out prompts
    (a disjoint set of validation documents) and both figures are reported.
  --delta>0, Learn-then-Test with Hoeffding's p-value exp(-2 n (epsilon - mean risk)_+^2)
    over n prompts (per-prompt risks are independent and in [0, 1]; tokens of one prompt
    are not, so they are not the unit): valid with probability >= 1 - delta, but it needs
    many prompts (n >= ln(1/delta) / (2 epsilon^2), 115 for delta = 0.1, epsilon = 0.1,
    even when nothing exits) and otherwise keeps threshold 1.

The chosen threshold is written to exit_threshold.json in the workdir (per measure and
exits); launch.decode / launch.bench --method=early_exit use it when --exit_threshold is
not given. Each threshold is its own compilation (a static setting of the decode loop).
"""
import json
import math
import os

from absl import app, flags

from launch import common

GRID = (1.0, 0.99, 0.975, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)

def _define_flags():
  """The command line's flags, defined only when this module runs as the program: the
  library functions above are imported by tests beside other entry points that define
  --workdir too."""
  global _WORKDIR, _AGREEMENT, _CONFIDENCE, _EXITS, _DELTA, _NUM_PROMPTS, _PROMPT_LEN
  global _MAX_NEW, _GRID
  _WORKDIR = flags.DEFINE_string('workdir', None, 'An early-exit model (configs/early_exit.py).')
  _AGREEMENT = flags.DEFINE_float('agreement', 0.9, 'Requested token agreement in (0, 1].')
  _CONFIDENCE = flags.DEFINE_string('confidence', 'softmax',
                                    'softmax | top2 | state | classifier.')
  _EXITS = flags.DEFINE_string('exit_layers', '', 'The exits used ("2,4"); default: all.')
  _DELTA = flags.DEFINE_float('delta', 0.0, '0: empirical rule; > 0: Learn-then-Test with '
                              'Hoeffding p-values at this error level.')
  _NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 16, 'Calibration prompts (and as many '
                                      'held-out ones).')
  _PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Tokens per prompt.')
  _MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'New tokens per prompt.')
  _GRID = flags.DEFINE_list('thresholds', [str(t) for t in GRID],
                            'Thresholds tried, from the safest down.')
  flags.mark_flags_as_required(['workdir'])


def hoeffding_p(risks, epsilon: float) -> float:
  """The p-value of "mean risk > epsilon" from n risks in [0, 1] (Hoeffding)."""
  n = len(risks)
  gap = max(epsilon - sum(risks) / max(n, 1), 0.0)
  return math.exp(-2 * n * gap * gap)


def choose_threshold(thresholds, agreements, target: float, delta: float = 0.0):
  """Fixed-sequence testing down `thresholds` (safest first) with per-prompt agreements
  agreements[i] (a list per threshold). delta = 0: a threshold passes when its mean
  agreement >= target; delta > 0: when Hoeffding's p-value of risk > 1 - target is <=
  delta. Returns (the last threshold that passed before the first failure, or None when
  the first fails; [(threshold, mean agreement, passed)]). Raises ValueError for a target
  outside (0, 1], delta outside [0, 1) or thresholds not decreasing."""
  if not 0 < target <= 1:
    raise ValueError(f'agreement={target} is outside (0, 1].')
  if not 0 <= delta < 1:
    raise ValueError(f'delta={delta} is outside [0, 1).')
  if list(thresholds) != sorted(thresholds, reverse=True):
    raise ValueError(f'thresholds {list(thresholds)} must decrease (the safest first).')
  chosen, table, failed = None, [], False
  for threshold, rows in zip(thresholds, agreements):
    mean = sum(rows) / max(len(rows), 1)
    if delta > 0:
      passed = hoeffding_p([1 - a for a in rows], 1 - target) <= delta
    else:
      passed = mean >= target
    table.append((threshold, mean, passed))
    if not passed:
      failed = True
    if not failed:
      chosen = threshold
  return chosen, table


def calibrate(restored, target: float, measure: str = 'softmax', exit_layers: str = '',
              delta: float = 0.0, num_prompts: int = 16, prompt_len: int = 32,
              max_new_tokens: int = 32, thresholds=GRID, log=print) -> dict:
  """Decodes `num_prompts` validation documents' first `prompt_len` tokens with CALM at
  each threshold (greedy), chooses one (choose_threshold) and measures it on as many
  held-out documents. Returns the calibration entry (also what exit_threshold.json holds
  under early_exit.calibration_key(measure, exit_layers))."""
  from decoding import early_exit
  from launch import benchmarking, generation
  early_exit.check_model(restored.model)
  for t in thresholds:
    early_exit.check_threshold(t)
  if measure not in early_exit.MEASURES:
    raise ValueError(f'Unknown confidence measure {measure!r}; expected one of '
                     f'{", ".join(early_exit.MEASURES)}.')
  prompts = benchmarking.validation_prompts(restored, 2 * num_prompts, prompt_len)
  calib, held_out = prompts[:num_prompts], prompts[num_prompts:]

  def agreements(prompt_set, threshold):
    options = generation.DecodeOptions(max_new_tokens=max_new_tokens, exit_threshold=threshold,
                                       exit_confidence=measure, exit_layers=exit_layers)
    completions, stats = generation.decode_tokens(restored, prompt_set, 'early_exit', options)
    rows = benchmarking.token_agreement(restored.model, restored.params, prompt_set,
                                        completions)
    return rows, stats

  per_threshold = []
  for t in thresholds:
    rows, stats = agreements(calib, t)
    per_threshold.append(rows)
    log(f'threshold {t:g}: calibration agreement {sum(rows) / len(rows):.3f}, mean exit layer '
        f'{stats["mean_exit_layer"]:.2f}')
    chosen, table = choose_threshold(thresholds[:len(per_threshold)], per_threshold, target,
                                     delta)
    if not table[-1][2]:
      break  # Fixed-sequence testing stops at the first failure.
  entry = dict(confidence=measure, exit_layers=exit_layers, target_agreement=target,
               delta=delta, threshold=1.0 if chosen is None else chosen,
               calibration=[dict(threshold=t, agreement=a, passed=p) for t, a, p in table],
               num_prompts=num_prompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens)
  rows, stats = agreements(held_out, entry['threshold'])
  entry.update(held_out_agreement=sum(rows) / len(rows),
               held_out_mean_exit_layer=stats['mean_exit_layer'])
  log(f'chosen threshold {entry["threshold"]:g}: held-out agreement '
      f'{entry["held_out_agreement"]:.3f} (requested {target:g}), mean exit layer '
      f'{stats["mean_exit_layer"]:.2f}')
  return entry


def save(workdir: str, entry: dict) -> str:
  """Adds `entry` to the workdir's exit_threshold.json; returns its path."""
  from decoding import early_exit
  path = os.path.join(workdir, early_exit.CALIBRATION_FILE)
  found = {}
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
  found[early_exit.calibration_key(entry['confidence'], entry['exit_layers'])] = entry
  with open(path, 'w') as f:
    json.dump(found, f, indent=1)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from training import checkpoints
  with common.user_errors_as_messages():
    try:
      grid = tuple(float(t) for t in _GRID.value)
    except ValueError:
      raise ValueError(f'--thresholds={",".join(_GRID.value)}: expected numbers.') from None
    choose_threshold(grid, [[] for _ in grid], _AGREEMENT.value, _DELTA.value)  # checks
    restored = checkpoints.restore_model(_WORKDIR.value)
    entry = calibrate(restored, _AGREEMENT.value, _CONFIDENCE.value, _EXITS.value,
                      _DELTA.value, _NUM_PROMPTS.value, _PROMPT_LEN.value, _MAX_NEW.value,
                      grid)
    print(json.dumps(entry))
    save(_WORKDIR.value, entry)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
