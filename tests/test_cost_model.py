"""The cost model (decoding/cost_model.py): hand-computed predictions and choices."""
import pytest

from decoding import cost_model


def test_expected_tokens_covers_each_calibrated_segment_in_shorter_rounds():
  # K_max = 3: half the rounds accept nothing (1 token), half all three (4 tokens); k = 1
  # covers a 4-token segment in 2 rounds, k = 2 in 2 as well: 25 tokens in 15 rounds.
  histogram = [5, 0, 0, 5]
  assert cost_model.expected_tokens(histogram, 0) == 1.0
  assert cost_model.expected_tokens(histogram, 1) == pytest.approx(25 / 15)
  assert cost_model.expected_tokens(histogram, 2) == pytest.approx(25 / 15)
  assert cost_model.expected_tokens(histogram, 3) == 2.5
  with pytest.raises(ValueError, match='outside the calibrated'):
    cost_model.expected_tokens(histogram, 4)
  with pytest.raises(ValueError, match='empty'):
    cost_model.expected_tokens([0, 0], 1)


def test_shorter_drafts_take_the_rounds_the_calibration_predicts():
  """Under greedy a draft model's chain depends only on the context, so a K_max round
  that accepted n drafted tokens is covered by ceil((n + 1) / (k + 1)) rounds of k
  (cost_model.expected_tokens): per row, exactly, but for the last segment, which the
  length cap may cut (at most ceil((K_max + 1) / (k + 1)) - 1 fewer rounds). Counting
  one k-round per K_max round (the former E[min(n, k)] + 1) misses by far more."""
  import math
  import jax
  import jax.numpy as jnp
  import numpy as np
  from decoding import driver
  from decoding.speculative import SpeculativeConfig
  from tests.test_speculative import PROMPTS, TARGET
  model, params = TARGET
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  draft = treedef.unflatten([x + 0.15 * jnp.std(x) * jax.random.normal(key, x.shape)
                             for x, key in zip(leaves, keys)])
  padded, lengths = driver.pad_prompts(PROMPTS)
  rows, k_max = len(PROMPTS), 8

  def run(k):
    config = SpeculativeConfig(40, 64, num_draft=k, eos_ids=())
    out = driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                          jax.random.PRNGKey(0), model, draft)
    return np.asarray(out.tokens), np.asarray(out.stats['accepted_histogram'])

  tokens, calibration = run(k_max)
  n = np.arange(k_max + 1)
  assert calibration[1:k_max].sum() > 0 and calibration[k_max] > 0, calibration
  for k in (1, 2, 4):
    k_tokens, histogram = run(k)
    np.testing.assert_array_equal(k_tokens, tokens)
    predicted = int((calibration * np.ceil((n + 1) / (k + 1))).sum())
    slack = rows * (math.ceil((k_max + 1) / (k + 1)) - 1)
    assert 0 <= predicted - histogram.sum() <= slack, (k, predicted, histogram.sum())
    assert calibration.sum() < histogram.sum() - slack   # one k-round per K_max round


def test_verify_cost_interpolates_and_extrapolates():
  curve = {1: 10.0, 2: 12.0, 4: 16.0}        # relative to T = 1: 1, 1.2, 1.6
  assert cost_model.verify_cost(curve, 1) == 1.0
  assert cost_model.verify_cost(curve, 3) == pytest.approx(1.4)
  assert cost_model.verify_cost(curve, 6) == pytest.approx(2.0)  # slope 0.2 per token
  with pytest.raises(ValueError, match='needs T = 1'):
    cost_model.verify_cost({2: 1.0}, 2)


def test_a_flat_curve_picks_the_longest_draft_a_steep_one_falls_back_to_ar():
  histogram = [2, 2, 2, 2, 2]                 # n uniform on 0..4
  flat = {1: 1.0, 8: 1.0}                     # an accelerator: verify is free
  choice = cost_model.choose_num_draft(histogram, flat)
  assert choice.num_draft == 4 and choice.predicted_speedup == pytest.approx(3.0)
  steep = {1: 1.0, 2: 2.0, 8: 8.0}            # compute-bound: T tokens cost T steps
  choice = cost_model.choose_num_draft(histogram, steep)
  assert choice.num_draft == 0 and choice.predicted_speedup == 1.0
  # k = 1: 30 tokens in 18 rounds (n + 1 = 1..5 in 1, 1, 2, 2, 3 rounds), cost 2.
  assert choice.predicted[1] == pytest.approx(30 / 18 / 2.0)


def test_overhead_per_round_and_per_drafted_token():
  curve = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7}
  assert cost_model.measured_overhead(2.3, 3, curve, per_token=False) == pytest.approx(1.0)
  assert cost_model.measured_overhead(2.3, 3, curve, per_token=True) == pytest.approx(1 / 3)
  histogram = [0, 0, 0, 10]                   # always accepts all three
  # Per round: k=3 -> 4 / (1.3 + 1) = 1.74; per token (1/3 each): k=3 -> 4 / 2.3 = 1.74 too,
  # k=1 -> 2 / (1.1 + 1/3) = 1.40.
  per_round = cost_model.choose_num_draft(histogram, curve, overhead=1.0)
  per_token = cost_model.choose_num_draft(histogram, curve, overhead=1 / 3, per_token=True)
  assert per_round.num_draft == per_token.num_draft == 3
  assert per_token.predicted[1] == pytest.approx(2 / (1.1 + 1 / 3))
  assert cost_model.choose_num_draft(histogram, curve, overhead=5.0).num_draft == 0


def test_auto_draft_length_decodes_like_ar_and_reports_its_choice(trained_tiny,
                                                                  quick_verify_cost):
  from launch import generation
  tok = trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(t)] for t in ('import os\nimport os\n', 'def f(x):\n')]
  ar, _ = generation.decode_tokens(trained_tiny, prompts, 'autoregressive',
                                   generation.DecodeOptions(max_new_tokens=24))
  out, stats = generation.decode_tokens(
      trained_tiny, prompts, 'lookup', generation.DecodeOptions(max_new_tokens=24,
                                                                num_draft='auto'))
  assert out == ar
  auto = stats['auto']
  # Prompt lookup weighs draft lengths up to 16 (its registry entry's auto_max_draft).
  assert auto['option'] == 'num_draft' and 0 <= auto['chosen'] <= 16
  assert auto['method'] == ('lookup' if auto['chosen'] else 'autoregressive')
  assert set(auto['predicted_speedup']) == {str(k) for k in range(17)}
  assert len(auto['calibration_histogram']) == 17 and sum(auto['calibration_histogram']) > 0


def test_auto_is_refused_where_a_method_has_no_draft_length():
  from decoding import registry
  from launch import autotune, generation
  with pytest.raises(ValueError, match='--num_draft=auto: --method=jacobi has no automatic'):
    autotune.wants_auto(registry.get('jacobi'), generation.DecodeOptions(num_draft='auto'))
  assert autotune.wants_auto(registry.get('jacobi'),
                             generation.DecodeOptions(jacobi_window='auto'))
  with pytest.raises(ValueError, match='positive integer or auto'):
    generation.draft_length('0', 'num_draft')


def test_auto_with_nothing_to_calibrate_is_plain_decoding(trained_tiny, quick_verify_cost):
  from launch import generation
  tok = trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode('import os\n')]]
  out, stats = generation.decode_tokens(
      trained_tiny, prompts, 'lookup', generation.DecodeOptions(max_new_tokens=1,
                                                                num_draft='auto'))
  assert stats['auto']['chosen'] == 0 and len(out[0]) == 1
  # The JSON of launch.decode names what ran, and what was asked for.
  result = generation.decode_texts(trained_tiny, ['import os\n'], 'lookup',
                                   generation.DecodeOptions(max_new_tokens=1, num_draft='auto'))
  assert (result['method'], result['requested_method']) == ('autoregressive', 'lookup')
  assert generation.decode_texts(trained_tiny, ['import os\n'], 'lookup',
                                 generation.DecodeOptions(max_new_tokens=1))['method'] == 'lookup'
  from decoding import registry
  from launch import autotune
  with pytest.raises(ValueError, match='does not apply with --tree or --lookup_branches'):
    autotune.wants_auto(registry.get('lookup'), generation.DecodeOptions(
        num_draft='auto', lookup_branches=3))


def test_tree_size_weighs_the_greedy_chances_against_the_curve():
  from decoding import trees
  chances = {(0,): .6, (1,): .2, (0, 0): .4, (0, 0, 0): .1, (2,): .05}
  order = trees.greedy_order(chances, 5)
  assert order == [(0,), (0, 0), (1,), (0, 0, 0), (2,)]   # every prefix is a tree
  tokens = [1.0, 1.6, 2.0, 2.2, 2.3, 2.35]
  flat = {1: 1.0, 8: 1.0}
  assert cost_model.choose_tree_size(tokens, flat).num_draft == 5
  # c(b + 1) = 1 + 0.25 b: 2.0 / 1.5 = 1.33 at b = 2 beats 2.2 / 1.75 = 1.26 at b = 3.
  linear = {1: 1.0, 2: 1.25, 4: 1.75, 8: 2.75}
  choice = cost_model.choose_tree_size(tokens, linear)
  assert choice.num_draft == 2 and choice.predicted[2] == pytest.approx(2.0 / 1.5)
  assert cost_model.choose_tree_size(tokens, linear, overhead=1.0).num_draft == 0
  with pytest.raises(ValueError, match='plain decoding'):
    cost_model.choose_tree_size([2.0, 3.0], flat)


def _auto_tree_decode(trained_tiny, method, second):
  """(tokens of `method` with --tree=auto, plain greedy tokens, the method's stats) on two
  code prompts, 16 new tokens."""
  from launch import generation
  tok = trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(t)] for t in ('import os\nimport sys\n', 'def f(x):\n')]
  # On one device, as on a CPU (weight_layout auto there): cached programs (conftest),
  # and the curve of a per_block decode measured on a machine of several devices.
  one = dict(max_new_tokens=16, weight_layout='per_block')
  ar, _ = generation.decode_tokens(trained_tiny, prompts, 'autoregressive',
                                   generation.DecodeOptions(**one))
  out, stats = generation.decode_tokens(trained_tiny, prompts, method,
                                        generation.DecodeOptions(**one, tree='auto'), second)
  return out, ar, stats


def test_auto_tree_of_medusa_heads_decodes_like_ar(trained_tiny, trained_medusa,
                                                   quick_verify_cost):
  from decoding import registry
  from launch import autotune, generation
  out, ar, stats = _auto_tree_decode(trained_tiny, 'medusa', trained_medusa[1])
  assert out == ar
  auto = stats['auto']
  assert auto['option'] == 'tree' and 0 <= auto['chosen'] <= autotune.AUTO_MAX_TREE
  assert auto['calibration_tau'] >= 1.0 and auto['greedy_chance_tau'] >= 1.0
  assert (stats.get('tree', '') == auto['tree']) if auto['chosen'] else 'tree' not in stats
  with pytest.raises(ValueError, match='--tree=auto sizes the static tree of Medusa or MTP'):
    autotune.wants_auto(registry.get('lookup'), generation.DecodeOptions(tree='auto'))


def test_auto_budget_of_eagle_trees_decodes_like_ar(trained_tiny, trained_eagle,
                                                    quick_verify_cost):
  """--tree=auto on EAGLE: the budget priced from the calibration's accepted ranks; the
  decode equals plain greedy; the prediction at the calibration's own budget is its
  measured tau (the rank counts add up to the accepted-count histogram)."""
  from launch import autotune
  out, ar, stats = _auto_tree_decode(trained_tiny, 'eagle', trained_eagle[1])
  assert out == ar
  auto = stats['auto']
  assert auto['option'] == 'tree' and 0 <= auto['chosen'] <= autotune.AUTO_MAX_TREE
  taus = [auto['predicted_tau'][str(b)] for b in sorted(int(b) for b in auto['predicted_tau'])]
  assert taus == sorted(taus) and taus[0] >= 1.0          # more nodes never accept less
  # At the calibration's own budget the prediction is the calibration's measured tau.
  assert auto['predicted_tau'][str(autotune.AUTO_MAX_TREE)] == auto['calibration_tau']
  if auto['chosen']:
    assert stats['tree'] == auto['tree'] == f'dynamic:4,5,{auto["chosen"]}'
  else:
    assert 'tree' not in stats


def test_auto_with_one_new_token_skips_the_calibration():
  """max_new_tokens 1: the prefill makes the only token, so auto is plain decoding at once
  (no model is touched: restored is None here)."""
  from launch import autotune, generation
  for method, option in (('lookup', dict(num_draft='auto')), ('eagle', dict(tree='auto'))):
    run, options, report = autotune.resolve(
        None, [[1, 2, 3]], method, generation.DecodeOptions(max_new_tokens=1, **option))
    assert run == 'autoregressive' and report['chosen'] == 0
    assert report['calibration_s'] == 0.0 and 'max_new_tokens' in report['reason']
