"""The cost model: which draft length makes a chain method fastest on this machine.

Speculation pays only when the tokens a round commits outweigh what the round costs
relative to one plain decoding step. Both sides are measured, not assumed:

  verify cost   c(T): one cached forward of T tokens relative to T = 1, for the model,
                backend and batch at hand (launch.bench's verify-cost curve). On an
                accelerator c(T) stays near 1 for small T (decoding is memory-bound);
                on a CPU it grows with T, which is what decides there.
  acceptance    the histogram of accepted drafted tokens per row-round from a short
                calibration run at the longest draft length K_max considered
                (driver.Output.stats['accepted_histogram']).

For a chain the calibration's rounds at K_max say what shorter drafts would do, with no
i.i.d. acceptance model (Leviathan et al. 2023, section 3.5). A K_max round that
accepted n drafted tokens committed a segment of n + 1 tokens (the accepted prefix and
the target's own token), ending where the draft first disagreed with the target. Drafts
of k <= K_max tokens cover the same segment in ceil((n + 1) / (k + 1)) rounds: under
greedy, a drafter whose chain depends only on the context (a draft model) drafts in
each of those rounds the continuation of the K_max chain, so every round but the last
accepts all k tokens, and the last stops at the same disagreement, where the two runs
meet again. Summed over the calibration's row-rounds (histogram h[n]):

  tokens(k) = sum_n h[n] (n + 1) / sum_n h[n] ceil((n + 1) / (k + 1))   (per round)
  cost(k)   = c(k + 1) + overhead(k)          (in plain decoding steps)
  speedup(k) = tokens(k) / cost(k)            (plain decoding: tokens(0) = cost(0) = 1)

Per segment this is exact under greedy for a draft model; for prompt lookup (a later
round may match elsewhere), a Jacobi window (its guesses carry state) and under sampling
(each round draws afresh) it is an estimate. It replaced tokens(k) = E[min(n, k)] + 1,
which counts one k-round per K_max round and so under-predicts short drafts wherever
long stretches are accepted: on SmolLM2 summarization at batch 8 (calibration histogram
n = 0..8: 80 / 16 / 0 / 0 / 0 / 8 / 0 / 0 / 24) it gave tau 2.13 at k = 4 against 2.35
here; the decode at k = 4 measured 2.86 (its later tokens copied more of the prompt than
the 48 calibrated ones).

overhead(k) is what a round costs beyond its verify call (proposing, verifying,
committing), in plain steps, also measured in the calibration run: per drafted token
for a method that calls a draft model (its calls grow with k), per round otherwise.
The choice is the k with the largest predicted speedup, and plain decoding (k = 0)
when no k beats it by `margin`: the fallback that keeps `auto` from losing to AR.

For a static tree of Medusa / MTP heads (`--tree=auto`) the same holds with the tree's
node count b in place of k: Medusa's greedy growth adds nodes in order of measured
acceptance chance, so the b-node tree is a subtree of the (b+1)-node one and
tokens(b) = 1 + the sum of its b chances (launch/tree_tuning.py measures them);
cost(b) = c(b + 1) + the round overhead (choose_tree_size).
"""
import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Choice:
  """num_draft: the chosen draft length, 0 = plain autoregressive decoding;
  predicted: {k: predicted speedup over plain decoding} for every k considered."""
  num_draft: int
  predicted: Mapping[int, float]

  @property
  def predicted_speedup(self) -> float:
    return self.predicted[self.num_draft]


def check_curve(curve: Mapping[int, float]) -> dict[int, float]:
  """{T: relative cost} with T = 1 present and costs > 0, as ints/floats, sorted.
  Raises ValueError naming what is wrong."""
  out = {int(t): float(c) for t, c in sorted(curve.items(), key=lambda kv: int(kv[0]))}
  if 1 not in out:
    raise ValueError(f'A verify-cost curve needs T = 1 (the plain step); got T = {list(out)}.')
  if any(t < 1 or not c > 0 for t, c in out.items()):
    raise ValueError(f'A verify-cost curve maps T >= 1 to costs > 0; got {out}.')
  return out


def verify_cost(curve: Mapping[int, float], tokens: int) -> float:
  """c(tokens) relative to one token: linear interpolation between measured T, linear
  extrapolation from the last two points past the largest (never below the last).

  curve: {T: cost of a T-token cached forward relative to T = 1}. Raises ValueError
  for a curve without T = 1 or with a non-positive cost."""
  curve = check_curve(curve)
  ts = np.asarray(list(curve), np.float64)
  cs = np.asarray(list(curve.values()), np.float64) / curve[1]
  if tokens <= ts[-1]:
    return float(np.interp(tokens, ts, cs))
  if len(ts) == 1:
    return float(cs[0] * tokens)  # Nothing measured past one token: assume linear.
  slope = max((cs[-1] - cs[-2]) / (ts[-1] - ts[-2]), 0.0)
  return float(cs[-1] + slope * (tokens - ts[-1]))


def expected_tokens(histogram: Sequence[float], k: int) -> float:
  """tokens(k): tokens committed per row-round when drafting k tokens, predicted from a
  calibration at K_max = len(histogram) - 1 (histogram[n] = row-rounds that accepted n
  drafted tokens): sum_n h[n] (n + 1) / sum_n h[n] ceil((n + 1) / (k + 1)), each K_max
  round's segment of n + 1 tokens covered by k-rounds (module docstring; exact per
  segment under greedy for a draft model). tokens(0) = 1 and tokens(K_max) = the
  calibration's tau. Raises ValueError for k outside 0..K_max or an empty histogram."""
  h = np.asarray(histogram, np.float64)
  if h.sum() <= 0:
    raise ValueError('The calibration histogram is empty (no speculative rounds ran).')
  if not 0 <= k < len(h):
    raise ValueError(f'k={k} is outside the calibrated draft lengths 0..{len(h) - 1}.')
  segment = np.arange(len(h)) + 1.0
  return float((h * segment).sum() / (h * np.ceil(segment / (k + 1))).sum())


def measured_overhead(round_steps: float, num_draft: int, curve: Mapping[int, float],
                      per_token: bool) -> float:
  """The calibration run's cost beyond its verify calls, in plain steps: per drafted
  token (per_token) or per round. round_steps: the measured time of one round at
  num_draft = K_max divided by the measured time of one plain decoding step."""
  extra = max(round_steps - verify_cost(curve, num_draft + 1), 0.0)
  return extra / num_draft if per_token else extra


def choose_num_draft(histogram: Sequence[float], curve: Mapping[int, float],
                     overhead: float = 0.0, per_token: bool = False,
                     margin: float = 1.05) -> Choice:
  """The draft length with the largest predicted speedup, or 0 (plain decoding) when
  none is predicted to beat it by `margin` (1.05: a 5% predicted gain is needed, so
  noise in the calibration does not pick a method that loses).

  histogram: the calibration run's accepted histogram [K_max + 1]; curve: the
  verify-cost curve {T: cost}; overhead: measured_overhead(...) in plain steps, per
  drafted token if per_token else per round. Raises ValueError for a bad curve or an
  empty histogram, or margin < 1.
  """
  if margin < 1.0 or math.isnan(margin):
    raise ValueError(f'margin must be >= 1, got {margin}.')
  predicted = {0: 1.0}
  for k in range(1, len(histogram)):
    cost = verify_cost(curve, k + 1) + overhead * (k if per_token else 1)
    predicted[k] = expected_tokens(histogram, k) / cost
  return _best(predicted, margin)


def choose_tree_size(tokens: Sequence[float], curve: Mapping[int, float],
                     overhead: float = 0.0, margin: float = 1.05) -> Choice:
  """The static tree size (nodes besides the root) with the largest predicted speedup,
  or 0 (plain decoding) when none is predicted to beat it by `margin`.

  tokens: [B_max + 1], tokens[b] = expected tokens per round of the b-node tree
  (tokens[0] = 1: plain decoding), e.g. 1 + the cumulative sum of the greedy-ordered node
  chances (trees.grow_tree); curve: the verify-cost curve {T: cost}; overhead: the round's
  cost beyond its verify call, in plain steps. Choice.num_draft holds the node count.
  Raises ValueError for a bad curve, tokens[0] != 1, or margin < 1."""
  if margin < 1.0 or math.isnan(margin):
    raise ValueError(f'margin must be >= 1, got {margin}.')
  if not len(tokens) or abs(tokens[0] - 1.0) > 1e-9:
    raise ValueError(f'tokens[0] is plain decoding\'s one token per step; got {list(tokens)[:1]}.')
  predicted = {0: 1.0}
  for b in range(1, len(tokens)):
    predicted[b] = float(tokens[b]) / (verify_cost(curve, b + 1) + overhead)
  return _best(predicted, margin)


def _best(predicted: dict, margin: float) -> Choice:
  """The key with the largest predicted speedup (the smaller on ties), 0 below margin."""
  best = max(predicted, key=lambda k: (predicted[k], -k))
  return Choice(num_draft=best if predicted[best] >= margin else 0, predicted=predicted)
