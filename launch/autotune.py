"""`--num_draft=auto`: the draft length the cost model predicts fastest, or plain decoding.

A method whose registry entry names a `draft_length` option (speculative and lookup:
num_draft; jacobi: jacobi_window) may be given 'auto' there. Before the real decode:

  1. calibration: the first `CALIBRATION_PROMPTS` prompts, `CALIBRATION_TOKENS` new
     tokens each, decoded once with plain autoregressive decoding and once with the
     method at the longest draft length considered (K_max: the registry entry's
     `auto_max_draft`, 8 for draft models and Jacobi, 16 for prompt lookup), timed
     with the prefill split off (launch.generation.decode_tokens(time_prefill=True));
  2. the verify-cost curve of the model at this batch size and context
     (launch.benchmarking.verify_cost_curve, cached in the model's workdir);
  3. decoding/cost_model.choose_num_draft: the k in 1..K_max with the largest predicted
     speedup, from the calibration's accepted histogram (a K_max round that accepted n
     covers its n + 1 tokens in ceil((n + 1) / (k + 1)) rounds of k:
     cost_model.expected_tokens), the curve, and the round overhead the calibration
     measured beyond its verify call; or plain decoding when no k is predicted to beat
     it by 5%.

`--tree=auto` (methods with a tuned static tree: medusa, mtp) is the same for the tree's
size: the calibration measures the heads' path acceptance chances on the calibration
prompts' greedy continuations (launch/tree_tuning.acceptance_ranks), Medusa's greedy
growth orders the nodes (trees.greedy_order: every prefix is the best tree of its size),
and one calibration decode with the largest tree (AUTO_MAX_TREE nodes) measures the round
overhead and the tau actually reached under the run's sampling settings, which rescales
the greedy chances (tokens(b) = 1 + s * (sum of the first b chances), s = measured over
predicted tau - 1 at AUTO_MAX_TREE); cost_model.choose_tree_size picks the size.

`--tree=auto` for EAGLE / EAGLE-3 (EAGLE-2 dynamic trees) chooses the tree's budget
(verified nodes) at the default top_k and depth: one calibration decode with the largest
budget (AUTO_MAX_TREE, or the whole expansion pool if smaller) counts the accepted nodes
by their rank in EAGLE-2's reranking (driver.count_ranks). A budget-b tree is the
nodes of rank < b of the same expansion, so under greedy it accepts, in the same round,
exactly the accepted nodes of rank < b: tokens(b) = 1 + (accepted nodes of rank < b) /
row-rounds, exact for each of the calibration's rounds (tests/test_eagle.py). Over a
whole decode it is an estimate even under greedy: a smaller tree starts its later rounds
elsewhere (on the small trained target it under-predicted measured tau by up to 16%);
under sampling the kept siblings also change what recursive rejection sampling
accepts. cost_model.choose_tree_size then weighs tokens(b) against the verify-cost
curve and the round's measured overhead (the drafter's expansion, which does not depend
on the budget).

The calibration prompts are the workload's own first prompts (their first
CALIBRATION_TOKENS tokens): the acceptance of prompt lookup depends on the prompt, so a
fixed calibration set would answer for another workload. Its cost is reported
(calibration_s), not hidden, and is not part of the decode's wall_s.
"""
import dataclasses

from decoding import cost_model, registry

AUTO = 'auto'
AUTO_MAX_TREE = 48      # nodes besides the root: the largest static tree --tree=auto weighs
CALIBRATION_PROMPTS = 2
CALIBRATION_TOKENS = 48


def wants_auto(method: registry.Method, options) -> bool:
  """Whether `options` asks for the automatic draft length (or tree size) of `method`.
  Raises ValueError when 'auto' is given to an option the method does not read, or to a
  method without a draft length or tuned tree."""
  for name in ('num_draft', 'jacobi_window'):
    if getattr(options, name, None) == AUTO and name != method.draft_length:
      raise ValueError(f'--{name}=auto: --method={method.name} has no automatic '
                       f'{name} (its draft length option: {method.draft_length or "none"}).')
  if getattr(options, 'tree', '') == AUTO:
    if not (method.tuned_tree or method.dynamic_tree):
      raise ValueError(f'--tree=auto sizes the static tree of Medusa or MTP heads or the '
                       f'dynamic tree of EAGLE / EAGLE-3 from their measured acceptance; '
                       f'it is not implemented for --method={method.name}.')
    return True
  wanted = method.draft_length is not None and getattr(options, method.draft_length) == AUTO
  if wanted and (getattr(options, 'tree', '') or getattr(options, 'lookup_branches', 1) > 1):
    # The cost model prices a chain: k drafted tokens, one k + 1 token call per round.
    raise ValueError(f'--{method.draft_length}=auto chooses a chain length; it does not '
                     'apply with --tree or --lookup_branches > 1.')
  return wanted


# Timed runs of each calibration program (median), after one untimed warm-up run: single
# first runs of the same program differ by up to 40% on a shared CPU, and one such reading
# of the round overhead (0.24 plain steps where repeats read about 7) once made the cost
# model pick an EAGLE tree that ran at 0.28x of plain decoding.
CALIBRATION_REPEATS = 3


def _calibrate(restored, calibration, method: str, options, draft):
  """Plain decoding and `method` (with `options`, already at the largest setting) on the
  calibration prompts, prefill timed apart, each program warmed up and timed
  CALIBRATION_REPEATS times (median). -> (method's stats, its round time in plain
  decoding steps)."""
  from launch import generation
  base = registry.options_for(registry.get('autoregressive'), options)
  timing = dict(time_prefill=True, repeats=CALIBRATION_REPEATS, warmup=True)
  _, ar = generation.decode_tokens(restored, calibration, 'autoregressive', base, **timing)
  _, spec = generation.decode_tokens(restored, calibration, method, options, draft, **timing)
  # Plain steps: every target call after the prefill; method rounds likewise.
  calls = -(-len(calibration) // options.batch_size)
  ar_step = ar['decode_s'] / max(ar['target_calls'] - calls, 1)
  return spec, spec['decode_s'] / max(spec['target_calls'] - calls, 1) / ar_step


def _short(prompts, options):
  """The calibration prompts and options (fewer new tokens, one batch)."""
  calibration = prompts[:CALIBRATION_PROMPTS]
  return calibration, dataclasses.replace(
      options, max_new_tokens=min(options.max_new_tokens, CALIBRATION_TOKENS),
      batch_size=options.batch_size or len(calibration))


def _curve(restored, prompts, options, largest: int) -> dict:
  """The verify-cost curve at the run's batch size and mid-decode context, up to T =
  `largest` (cached in the model's workdir). Mid-decode: halfway from the longest prompt
  to the end of the decode, which --max_context may cut short."""
  from launch import benchmarking
  longest = max(len(p) for p in prompts)
  end = min(options.max_context, longest + options.max_new_tokens)
  context = longest + max(end - longest, 0) // 2
  batch = options.batch_size or min(len(prompts), 8)
  return benchmarking.verify_cost_curve(
      restored, batch, context,
      tokens=tuple(t for t in benchmarking.VERIFY_COST_TOKENS if t <= 2 * largest),
      weight_layout=options.weight_layout)


def _plain(options):
  return 'autoregressive', registry.options_for(registry.get('autoregressive'), options)


def resolve(restored, prompts: list[list[int]], method: str, options, draft=None):
  """The options with the method's draft length (or tree) chosen by the cost model (see
  the module docstring), and a report {'auto': {...}} for the stats: the chosen length (0
  = the method is replaced by plain autoregressive decoding), the predicted speedup per
  k, the calibration's accepted histogram, overhead and time.

  restored / draft: checkpoints.RestoredModel of the target and the method's second
  model; prompts: the token prompts to decode. Returns (method name to run, options,
  report). Raises ValueError as launch.generation.decode_tokens does."""
  import time
  entry = registry.get(method)
  if options.max_new_tokens <= 1:
    # The prefill makes the only token: no round to draft for, nothing to calibrate.
    option = 'tree' if getattr(options, 'tree', '') == AUTO else entry.draft_length
    report = dict(option=option, chosen=0, predicted_speedup={'0': 1.0},
                  reason='max_new_tokens <= 1: the prefill makes the only token',
                  calibration_s=0.0)
    return (*_plain(options), report)
  if entry.tuned_tree and getattr(options, 'tree', '') == AUTO:
    return _resolve_tree(restored, prompts, method, options, draft)
  if entry.dynamic_tree and getattr(options, 'tree', '') == AUTO:
    return _resolve_dynamic_tree(restored, prompts, method, options, draft)
  name, k_max = entry.draft_length, entry.auto_max_draft
  t0 = time.perf_counter()
  calibration, short = _short(prompts, options)
  spec, round_steps = _calibrate(restored, calibration, method,
                                 dataclasses.replace(short, **{name: k_max}), draft)
  curve = _curve(restored, prompts, options, k_max + 1)
  if sum(spec['accepted_histogram']) == 0:
    # Every calibration row ended at its first token (max_new_tokens 1, an EOS, a full
    # context): nothing to calibrate on, and nothing a draft could speed up.
    report = dict(option=name, chosen=0, predicted_speedup={'0': 1.0},
                  calibration_histogram=spec['accepted_histogram'],
                  reason='no speculative round ran in the calibration',
                  calibration_s=round(time.perf_counter() - t0, 2))
    return (*_plain(options), report)
  per_token = spec.get('draft_calls', 0) > 0
  overhead = cost_model.measured_overhead(round_steps, k_max, curve, per_token)
  choice = cost_model.choose_num_draft(spec['accepted_histogram'], curve, overhead, per_token)
  report = dict(option=name, chosen=choice.num_draft,
                predicted_speedup={str(k): round(v, 3) for k, v in choice.predicted.items()},
                calibration_histogram=spec['accepted_histogram'],
                calibration_round_steps=round(round_steps, 3), overhead_steps=round(overhead, 3),
                overhead_per='drafted token' if per_token else 'round',
                calibration_s=round(time.perf_counter() - t0, 2))
  if choice.num_draft == 0:
    return (*_plain(options), report)
  return method, dataclasses.replace(options, **{name: choice.num_draft}), report


def _resolve_tree(restored, prompts, method: str, options, draft):
  """resolve() for `--tree=auto` (see the module docstring)."""
  import time
  import numpy as np
  from decoding import trees
  from launch import tree_tuning
  t0 = time.perf_counter()
  calibration, short = _short(prompts, options)
  ranks = tree_tuning.acceptance_ranks(restored, draft, calibration, short.max_new_tokens)
  chances = trees.path_chances(ranks) if len(ranks) else {}
  order = trees.greedy_order(chances, AUTO_MAX_TREE)
  greedy_tokens = 1.0 + np.cumsum([0.0] + [chances.get(p, 0.0) for p in order])
  largest = str(trees.SparseTree(tuple(order)))
  spec, round_steps = _calibrate(restored, calibration, method,
                                 dataclasses.replace(short, tree=largest), draft)
  curve = _curve(restored, prompts, options, AUTO_MAX_TREE + 1)
  measured_tau = spec['mean_accepted']   # tau: tokens per row per round
  # The greedy chances give the shape of tokens(b); the calibration decode, run with the
  # real sampling settings, its level (at temperature 0 the scale is close to 1).
  predicted_tau = greedy_tokens[-1]
  scale = (measured_tau - 1.0) / (predicted_tau - 1.0) if predicted_tau > 1.0 else 0.0
  tokens = 1.0 + scale * (greedy_tokens - 1.0)
  overhead = max(round_steps - cost_model.verify_cost(curve, AUTO_MAX_TREE + 1), 0.0)
  choice = cost_model.choose_tree_size(tokens, curve, overhead)
  chosen = str(trees.SparseTree(tuple(order[:choice.num_draft]))) if choice.num_draft else ''
  report = dict(option='tree', chosen=choice.num_draft, tree=chosen,
                predicted_speedup={str(b): round(v, 3) for b, v in choice.predicted.items()
                                   if b in (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
                                   or b == choice.num_draft},
                calibration_tau=round(float(measured_tau), 3),
                greedy_chance_tau=round(float(predicted_tau), 3),
                calibration_round_steps=round(round_steps, 3), overhead_steps=round(overhead, 3),
                calibration_s=round(time.perf_counter() - t0, 2))
  if not choice.num_draft:
    return (*_plain(options), report)
  return method, dataclasses.replace(options, tree=chosen), report


def _resolve_dynamic_tree(restored, prompts, method: str, options, draft):
  """resolve() for `--tree=auto` with an EAGLE-2 dynamic tree (see the module docstring).
  The chosen tree keeps the default top_k and depth (decoding.eagle.EagleConfig.tree)."""
  import time
  import numpy as np
  from decoding import eagle, trees
  t0 = time.perf_counter()
  default = eagle.EagleConfig.tree
  largest = trees.DynamicTreeSpec(default.top_k, default.depth,
                                  min(AUTO_MAX_TREE, default.pool_size))
  calibration, short = _short(prompts, options)
  spec, round_steps = _calibrate(restored, calibration, method,
                                 dataclasses.replace(short, tree=str(largest)), draft)
  rounds = sum(spec['accepted_histogram'])
  curve = _curve(restored, prompts, options, largest.budget + 1)
  if rounds == 0:
    report = dict(option='tree', chosen=0, tree='', predicted_speedup={'0': 1.0},
                  reason='no speculative round ran in the calibration',
                  calibration_s=round(time.perf_counter() - t0, 2))
    return (*_plain(options), report)
  by_rank = np.asarray(spec['accepted_rank_histogram'], np.float64)
  tokens = 1.0 + np.concatenate([[0.0], np.cumsum(by_rank)]) / rounds     # [budget + 1]
  overhead = max(round_steps - cost_model.verify_cost(curve, largest.budget + 1), 0.0)
  choice = cost_model.choose_tree_size(tokens, curve, overhead)
  chosen = (str(trees.DynamicTreeSpec(default.top_k, default.depth, choice.num_draft))
            if choice.num_draft else '')
  report = dict(option='tree', chosen=choice.num_draft, tree=chosen,
                predicted_speedup={str(b): round(v, 3) for b, v in choice.predicted.items()
                                   if b in (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
                                   or b == choice.num_draft},
                calibration_tau=round(float(spec['mean_accepted']), 3),
                predicted_tau={str(b): round(float(tokens[b]), 3)
                               for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, choice.num_draft)
                               if 0 < b < len(tokens)},
                calibration_round_steps=round(round_steps, 3), overhead_steps=round(overhead, 3),
                calibration_s=round(time.perf_counter() - t0, 2))
  if not choice.num_draft:
    return (*_plain(options), report)
  return method, dataclasses.replace(options, tree=chosen), report
