"""`--num_draft=auto`: the draft length the cost model predicts fastest, or plain decoding.

A method whose registry entry names a `draft_length` option (speculative and lookup:
num_draft; jacobi: jacobi_window) may be given 'auto' there. Before the real decode:

  1. calibration: the first `CALIBRATION_PROMPTS` prompts, `CALIBRATION_TOKENS` new
     tokens each, decoded once with plain autoregressive decoding and once with the
     method at the longest draft length considered (K_max = `AUTO_MAX_DRAFT`), timed
     with the prefill split off (launch.generation.decode_tokens(time_prefill=True));
  2. the verify-cost curve of the model at this batch size and context
     (launch.benchmarking.verify_cost_curve, cached in the model's workdir);
  3. decoding/cost_model.choose_num_draft: the k in 1..K_max with the largest predicted
     speedup, from the calibration's accepted histogram (the acceptance of k drafted
     tokens is min(n, k)), the curve, and the round overhead the calibration measured
     beyond its verify call; or plain decoding when no k is predicted to beat it by 5%.

The calibration prompts are the workload's own first prompts (their first
CALIBRATION_TOKENS tokens): the acceptance of prompt lookup depends on the prompt, so a
fixed calibration set would answer for another workload. Its cost is reported
(calibration_s), not hidden, and is not part of the decode's wall_s.
"""
import dataclasses

from decoding import cost_model, registry

AUTO = 'auto'
AUTO_MAX_DRAFT = 8
CALIBRATION_PROMPTS = 2
CALIBRATION_TOKENS = 48


def wants_auto(method: registry.Method, options) -> bool:
  """Whether `options` asks for the automatic draft length of `method`. Raises ValueError
  when 'auto' is given to an option the method does not read, or to a method without a
  draft length."""
  for name in ('num_draft', 'jacobi_window'):
    if getattr(options, name, None) == AUTO and name != method.draft_length:
      raise ValueError(f'--{name}=auto: --method={method.name} has no automatic '
                       f'{name} (its draft length option: {method.draft_length or "none"}).')
  wanted = method.draft_length is not None and getattr(options, method.draft_length) == AUTO
  if wanted and (getattr(options, 'tree', '') or getattr(options, 'lookup_branches', 1) > 1):
    # The cost model prices a chain: k drafted tokens, one k + 1 token call, min(n, k).
    raise ValueError(f'--{method.draft_length}=auto chooses a chain length; it does not '
                     'apply with --tree or --lookup_branches > 1.')
  return wanted


def resolve(restored, prompts: list[list[int]], method: str, options, draft=None):
  """The options with the method's draft length chosen by the cost model (see the module
  docstring), and a report {'auto': {...}} for the stats: the chosen length (0 = the
  method is replaced by plain autoregressive decoding), the predicted speedup per k, the
  calibration's accepted histogram, overhead and time.

  restored / draft: checkpoints.RestoredModel of the target and the method's second
  model; prompts: the token prompts to decode. Returns (method name to run, options,
  report). Raises ValueError as launch.generation.decode_tokens does."""
  import time
  from launch import benchmarking, generation
  entry = registry.get(method)
  name = entry.draft_length
  t0 = time.perf_counter()
  calibration = prompts[:CALIBRATION_PROMPTS]
  short = dataclasses.replace(options, max_new_tokens=min(options.max_new_tokens,
                                                          CALIBRATION_TOKENS),
                              batch_size=options.batch_size or len(calibration))
  base = registry.options_for(registry.get('autoregressive'), short)
  _, ar = generation.decode_tokens(restored, calibration, 'autoregressive', base,
                                   time_prefill=True)
  longest = dataclasses.replace(short, **{name: AUTO_MAX_DRAFT})
  _, spec = generation.decode_tokens(restored, calibration, method, longest, draft,
                                     time_prefill=True)
  # Plain steps: every target call after the prefill; method rounds likewise.
  calls = -(-len(calibration) // short.batch_size)
  ar_step = ar['decode_s'] / max(ar['target_calls'] - calls, 1)
  round_steps = spec['decode_s'] / max(spec['target_calls'] - calls, 1) / ar_step
  batch = short.batch_size
  context = max(len(p) for p in prompts) + options.max_new_tokens // 2
  curve = benchmarking.verify_cost_curve(
      restored, batch, context, tokens=tuple(t for t in benchmarking.VERIFY_COST_TOKENS
                                             if t <= 2 * (AUTO_MAX_DRAFT + 1)))
  if sum(spec['accepted_histogram']) == 0:
    # Every calibration row ended at its first token (max_new_tokens 1, an EOS, a full
    # context): nothing to calibrate on, and nothing a draft could speed up.
    report = dict(option=name, chosen=0, predicted_speedup={'0': 1.0},
                  calibration_histogram=spec['accepted_histogram'],
                  reason='no speculative round ran in the calibration',
                  calibration_s=round(time.perf_counter() - t0, 2))
    return 'autoregressive', registry.options_for(registry.get('autoregressive'), options), report
  per_token = spec.get('draft_calls', 0) > 0
  overhead = cost_model.measured_overhead(round_steps, AUTO_MAX_DRAFT, curve, per_token)
  choice = cost_model.choose_num_draft(spec['accepted_histogram'], curve, overhead, per_token)
  report = dict(option=name, chosen=choice.num_draft,
                predicted_speedup={str(k): round(v, 3) for k, v in choice.predicted.items()},
                calibration_histogram=spec['accepted_histogram'],
                calibration_round_steps=round(round_steps, 3), overhead_steps=round(overhead, 3),
                overhead_per='drafted token' if per_token else 'round',
                calibration_s=round(time.perf_counter() - t0, 2))
  if choice.num_draft == 0:
    return 'autoregressive', registry.options_for(registry.get('autoregressive'), options), report
  return method, dataclasses.replace(options, **{name: choice.num_draft}), report
