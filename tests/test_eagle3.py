"""EAGLE-3: training-time test is the drafting it simulates, exact greedy equality (with
EOS and the length cap inside accepted blocks), lossless sampling (G-test with power),
8 devices, a drafter of another target refused, clear errors for bad options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import autoregressive, driver, eagle, registry, trees, verify
from decoding.sampling import SamplingConfig
from launch import generation
from models import EagleDrafter, KVCache
from models.heads import check_feature_layers
from tests.test_speculative import (DRAFT, PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint,
                                    _g_test)
from training import checkpoints
from training.objectives import eagle as eagle_objective
from tests.sharded import generate_on_mesh
from tests.params import init as params_init


def _drafter(model, seed, layers=''):
  drafter = EagleDrafter(model.config, check_feature_layers(layers, model.config.num_layers))
  inputs = [jnp.zeros(s.shape, s.dtype) for s in drafter.example_inputs()]
  return drafter, params_init(drafter, seed, *inputs)['params']


def _eagle3(target, drafter, prompts, max_new, capacity, tree, seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = eagle.EagleConfig(max_new, capacity, tree=tree, **{'eos_ids': (2,), **kw})
  return driver.generate(target[0], target[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed), drafter[0], drafter[1])


def test_training_time_test_is_the_drafting_it_simulates():
  """Step j of the one-call-per-step unroll (masks.training_time_test_mask) at position t
  equals a cached chain drafted from the committed entries 0 .. t: the catch-up, then
  depth-j nodes reading the previous node's output; packed documents do not leak."""
  model, params = TARGET
  drafter, dparams = _drafter(model, 1, '0,1')
  steps, length = 3, 12
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, length + steps), 3, 60)
  segment_ids = jnp.asarray([[1] * 7 + [2] * 5])
  positions = jnp.asarray([list(range(7)) + list(range(5))])
  inputs = tokens[:, :length]
  out = model.apply({'params': params}, inputs, positions,
                    eagle_objective.masks.packed_causal_mask(segment_ids),
                    return_layer_hidden=True)
  features = eagle_objective.target_features(drafter, out)
  embedded = model.apply({'params': params}, tokens[:, 1:], method=model.embed)
  unrolled = eagle_objective.ttt_unroll(drafter, dparams, features, embedded, positions,
                                        segment_ids, steps)
  for t in (4, 9):   # 9: in the second document (its entries start at 7)
    first = 7 if t >= 7 else 0
    cache = KVCache.empty(drafter.layer_config, 1, 32)
    current, cache = drafter.apply({'params': dparams}, features[:, first:t + 1],
                                   embedded[:, first:t + 1], positions[:, first:t + 1], None,
                                   cache)
    current = current[:, -1:]
    np.testing.assert_allclose(current[:, 0], unrolled[0][:, t], atol=2e-5)
    for j in range(1, steps):
      current, cache = drafter.apply({'params': dparams}, current, embedded[:, t + j][:, None],
                                     positions[:, t:t + 1] + j, None, cache)
      np.testing.assert_allclose(current[:, 0], unrolled[j][:, t], atol=2e-5)


def test_greedy_equals_plain_greedy_at_batch_1_with_a_random_drafter():
  """(Batch 4, ragged, EOS and length cap inside accepted blocks: the trained test.)"""
  prompts = [PROMPTS[2]]
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _eagle3(TARGET, _drafter(TARGET[0], 3), prompts, 17, 30, trees.DynamicTreeSpec(2, 3, 6))
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)


def test_sampling_is_lossless():
  sampling, tree = SamplingConfig(temperature=1.0), trees.DynamicTreeSpec(2, 3, 6)
  rows, steps, prompt = 20_000, 3, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  drafter = _drafter(VOCAB6_TARGET[0], 4)

  def sample():
    out = _eagle3(VOCAB6_TARGET, drafter, [prompt] * rows, steps, len(prompt) + steps, tree,
                  seed=11, sampling=sampling, eos_ids=())
    return np.asarray(out.tokens[:, len(prompt):]), np.asarray(out.stats['accepted_histogram'])

  samples, hist = sample()
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the drafter is neither always right nor wrong'
  assert _g_test(samples, exact) > 1e-3
  # Power: not taking the residual after a rejected sibling must fail the same test.
  jax.clear_caches()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(verify, 'residual_log_probs', lambda p, q, log_weight=None: p)
    assert _g_test(sample()[0], exact) < 1e-3
  jax.clear_caches()


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  drafter = _drafter(TARGET[0], 5)
  kw = dict(tree=trees.DynamicTreeSpec(2, 2, 4), sampling=SamplingConfig(temperature=1.0))
  single = _eagle3(TARGET, drafter, prompts, 6, 16, **kw)
  out = generate_on_mesh(*TARGET, prompts, eagle.EagleConfig(6, 16, eos_ids=(2,), **kw),
                         *drafter)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  for stat in ('accepted_histogram', 'accepted_rank_histogram'):   # what --tree=auto reads
    np.testing.assert_array_equal(out.stats[stat], single.stats[stat])


def test_a_drafter_of_another_target_and_bad_options_are_one_line_errors():
  drafter = _drafter(TARGET[0], 6)
  other = DRAFT   # another target: d_model 32, 1 layer
  with pytest.raises(ValueError, match=r'EAGLE-3 drafter was trained on another target.*'
                                       r'num_layers 2 vs 1, d_model 64 vs 32'):
    _eagle3(other, drafter, PROMPTS[:1], 4, 12, trees.DynamicTreeSpec(2, 2, 4))
  options = generation.DecodeOptions(max_new_tokens=4)
  with pytest.raises(ValueError, match='EAGLE-3 drafter was trained on another target'):
    registry.get('eagle3').make_config(options, 12, (2,), other[0], drafter[0])
  restored = checkpoints.RestoredModel(None, None, drafter[0], drafter[1], 0, 'x')
  with pytest.raises(ValueError, match='eagle method needs an EAGLE drafter'):
    registry.get('eagle').drafter(restored)
  eagle1 = checkpoints.RestoredModel(None, None, EagleDrafter(TARGET[0].config), None, 0, 'x')
  with pytest.raises(ValueError, match='eagle3 method needs an EAGLE-3 drafter.*eagle3.py'):
    registry.get('eagle3').drafter(eagle1)
  for layers, message in (('0,2', r'block 2 is outside the target\'s 2 blocks'),
                          ('1', 'at least two target layers'), ('0;1', 'comma-separated')):
    with pytest.raises(ValueError, match=message):
      check_feature_layers(layers, 2)
  with pytest.raises(ValueError, match='ttt_steps=0'):
    eagle_objective.Eagle3Objective(TARGET[0].config, TARGET[0], TARGET[1], '', ttt_steps=0)
  for spec in ('dynamic:0,3,4', 'dynamic:2,3,99', '3,2'):
    with pytest.raises(ValueError) as error:
      registry.get('eagle3').make_config(
          generation.DecodeOptions(max_new_tokens=4, tree=spec), 12, (2,), TARGET[0],
          drafter[0])
    assert '\n' not in str(error.value), spec


def eos_some_rows_emit(completions) -> int:
  """A token some completions hold and others do not (the most common such)."""
  seen = [set(c) for c in completions]
  return min(set.union(*seen) - set.intersection(*seen),
             key=lambda t: (-sum(t in x for x in seen), t))


def _offline_depth1_acceptances(target, drafter, prompt, completion):
  """Greedy rounds of a depth-1, top-1 tree replayed without caches: the drafter run on
  the target's fused-layer features of the final sequence (as test_eagle.py's EAGLE
  replay). Returns the number of accepted drafts."""
  model, params = target
  seq = jnp.asarray([prompt + completion])
  positions = jnp.arange(seq.shape[1])[None]
  out = model.apply({'params': params}, seq, positions, return_layer_hidden=True)
  features = eagle_objective.target_features(drafter[0], out)
  embedded = model.apply({'params': params}, jnp.roll(seq, -1, axis=1), method=model.embed)
  predicted, _ = drafter[0].apply({'params': drafter[1]}, features, embedded, positions)
  logits = model.apply({'params': params}, predicted, method=model.logits)
  guess = np.asarray(jnp.argmax(logits[0, :, :model.config.vocab_size], -1))
  tokens, n, accepted = list(prompt + completion), len(prompt) + 1, 0
  while n < len(tokens):
    if guess[n - 2] == tokens[n]:
      accepted, n = accepted + 1, n + 2
    else:
      n += 1
  return accepted


def test_trained_drafter_reads_the_right_layers_stops_in_blocks_and_beats_a_random_one(
    trained_tiny, trained_eagle3):
  """EAGLE-3 trained briefly on the tiny target. (1) With a depth-1 tree the accepting
  rounds are exactly those a cache-free replay on the target's fused layers predicts.
  (2) Greedy equals plain greedy with an EOS id some rows emit (stops inside accepted
  blocks) and a length cap (batch 4, ragged). (3) tau beats a random drafter's."""
  metrics, trained = trained_eagle3
  assert metrics['head1_agree'] > 0.2 and 'head2_agree' in metrics, metrics
  assert trained.model.feature_layers == (0, 0, 1)
  tok = trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  target, drafter = (trained_tiny.model, trained_tiny.params), (trained.model, trained.params)
  plain = _ar(*target, prompts, 40, 80)
  completions = plain.completions()
  out = _eagle3(target, drafter, prompts, 40, 80, trees.DynamicTreeSpec(1, 1, 1))
  assert out.completions() == completions
  offline = sum(_offline_depth1_acceptances(target, drafter, p, c)
                for p, c in zip(prompts, completions))
  hist = np.asarray(out.stats['accepted_histogram'])
  assert hist[1] == offline and offline > 10, (hist, offline)

  # An EOS id that some rows emit and others do not: those stop inside a block, the
  # rest at the length cap (23 new tokens), in one batch.
  cap = 23
  eos = eos_some_rows_emit([c[:cap] for c in completions])
  padded, lengths = driver.pad_prompts(prompts)
  ar = driver.generate(*target, jnp.asarray(padded), jnp.asarray(lengths),
                       autoregressive.AutoregressiveConfig(cap, 80, eos_ids=(eos,)),
                       jax.random.PRNGKey(0))
  tree = trees.DynamicTreeSpec(3, 4, 10)
  out = _eagle3(target, drafter, prompts, cap, 80, tree, eos_ids=(eos,))
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  assert {f['reason'] for f in out.finish_reasons()} == {'stop', 'length'}
  hist = np.asarray(out.stats['accepted_histogram'])
  assert hist[2:].sum() > 0, hist
  random = _eagle3(target, (trained.model, _drafter(target[0], 9)[1]), prompts, cap, 80, tree,
                   eos_ids=(eos,))
  taus = [driver.mean_accepted(h) for h in (hist, random.stats['accepted_histogram'])]
  assert taus[0] > taus[1] + 0.3, taus
