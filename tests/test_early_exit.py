"""The early-exit family and CALM decoding (decoding/early_exit.py): training step (8
devices == 1), never-exit == plain greedy, state propagation, per-row exits, 8 devices,
calibration,
LayerSkip's trained self-speculation (greedy and sampling), the registry and clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import autoregressive, driver, early_exit, registry
from decoding.early_exit import EarlyExitConfig
from decoding.sampling import SamplingConfig
from decoding.self_speculative import SelfSpeculativeConfig
from launch import calibrate_exit, generation
from models import KVCache, Transformer, TransformerConfig
from tests import test_speculative as ts
from tests.sharded import generate_on_mesh
from tests.params import init as params_init

EOS = 2
PROMPTS = ts.PROMPTS


def _model(seed=0, vocab=60, **kw):
  config = TransformerConfig(vocab_size=vocab, **{'num_layers': 4, 'exit_layers': (1, 2, 3),
                                                  'exit_norm': True, **kw})
  model = Transformer(config)
  z = jnp.zeros((1, 1), jnp.int32)
  params = params_init(model, seed, z, z)['params']
  # Exit norms and classifier away from their initial values, so each exit head differs.
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), 2)
  if 'exit_norms' in params:
    params['exit_norms'] = 1 + 0.5 * jax.random.normal(keys[0], params['exit_norms'].shape)
  params['exit_classifier'] = jax.random.normal(keys[1], params['exit_classifier'].shape)
  return model, params


MODEL, PARAMS = _model()


def _decode(config, prompts=PROMPTS, model=MODEL, params=PARAMS, seed=0):
  padded, lengths = driver.pad_prompts(prompts)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


def _calm(threshold, measure='softmax', max_new=12, capacity=24, **kw):
  return EarlyExitConfig(max_new, capacity, eos_ids=(EOS,), threshold=threshold,
                         confidence=measure, **kw)


def _batch(rng, batch=8, length=16, vocab=60):
  tokens = rng.integers(3, vocab, (batch, length + 1))
  segments = np.ones((batch, length), np.int32)
  segments[:, length // 2:] = 2   # two packed documents per row
  positions = np.where(segments == 1, np.arange(length), np.arange(length) - length // 2)
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'positions': positions.astype(np.int32), 'segment_ids': segments,
          'loss_mask': np.ones((batch, length), np.float32),
          'target_bytes': np.ones((batch, length), np.int32)}


def test_training_step_on_8_devices_equals_one():
  """LayerSkip steps (layer dropout, rotating exit losses): the same parameters on 8
  devices as on one; the reported nll is the last layer's alone; CALM's and LayerSkip's
  exit weights follow their formulas."""
  from configs import early_exit as early_exit_config
  from training import objectives, trainer
  config = early_exit_config.get_config('size=tiny,layers=4,exits=1+2')
  config.batch_size, config.warmup_steps = 8, 1
  config.early_exit.layer_dropout = 0.5
  objective = objectives.build(config, 60)
  batch = _batch(np.random.default_rng(0))
  results = []
  for devices, model_parallelism in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    config.model_parallelism = model_parallelism
    setup = trainer.build(config, objective, batch, devices)
    state = setup.init_state()
    for _ in range(2):
      state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                        setup.frozen)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (single, m1), (sharded, m8) = results
  assert np.isclose(m1['loss'], m8['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    # Adam's first steps divide tiny gradients by their own size: 1e-4 absolute.
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
  # nll_sum is the plain LM's (the last layer, no dropout in eval) and every exit reports.
  params = single
  sums = objective.eval_sums(params, batch, jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
  plain = objectives.LanguageModelObjective(objective.model.config).loss(
      params, batch, None, None)[1]
  np.testing.assert_allclose(sums['nll_sum'], plain['nll_sum'], rtol=1e-5)
  assert {'exit1_nll_sum', 'exit2_nll_sum', 'exit1_agree_sum'} <= set(sums)
  # rotational: exit 2 (e = 1) and the last layer (3 + 1 + 2) at odd steps
  np.testing.assert_allclose(objective.exit_weights(jnp.asarray(1)), [0, 1 / 7, 6 / 7],
                             rtol=1e-6)
  rates = np.asarray(objective.dropout_rates())
  assert rates[0] == 0 and np.isclose(rates[-1], 0.5) and (np.diff(rates) > 0).all()
  config.early_exit.recipe = 'calm'  # w_i = i / sum_j j over the exits 1, 2 and the last 4
  np.testing.assert_allclose(objectives.build(config, 60).exit_weights(jnp.asarray(1)),
                             np.asarray([1, 2, 4]) / 7, rtol=1e-6)


@pytest.mark.parametrize('measure', ['softmax', 'classifier'])  # logits path; cond path
def test_threshold_one_never_exits_and_equals_plain_greedy(measure):
  ar = _decode(autoregressive.AutoregressiveConfig(12, 24, eos_ids=(EOS,)))
  out = _decode(_calm(1.0, measure))
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  hist = np.asarray(out.stats['exit_histogram'])
  assert hist[:-1].sum() == 0 and hist[-1] > 0
  assert int(out.stats['blocks_run']) == 4 * int(out.stats['steps'])


def _one_step(threshold, measure='softmax', prompts=PROMPTS):
  """Prefill `prompts`, then one CALM step on their last tokens -> (step results, the
  prefilled cache, positions)."""
  padded, lengths = driver.pad_prompts(prompts)
  lengths = jnp.asarray(lengths)
  config = _calm(threshold, measure)
  rows = jnp.arange(len(prompts))
  cache = MODEL.apply({'params': PARAMS}, jnp.asarray(padded),
                      jnp.broadcast_to(jnp.arange(padded.shape[1]), padded.shape),
                      cache=KVCache.empty(MODEL.config, len(prompts), 24)).cache
  cache = cache.keep(lengths - 1)
  tokens, positions = jnp.asarray(padded)[rows, lengths - 1], lengths - 1
  result = jax.jit(lambda c: early_exit.step(MODEL, PARAMS, config, (1, 2, 3), tokens,
                                             positions, c, jnp.zeros_like(lengths, bool),
                                             jax.random.PRNGKey(0)))(cache)
  return result, cache, tokens, positions


def _exit_states(cache, tokens, positions):
  """The plain forward of each row's token on the prefilled cache: block outputs L x [B, D]."""
  out = MODEL.apply({'params': PARAMS}, tokens[:, None], positions[:, None], cache=cache,
                    return_layer_hidden=True)
  return [h[:, 0] for h in out.layer_hidden]


def _exit_logits(state, index):
  """[B, D] block output -> [B, 60] exit `index`'s logits (real vocabulary)."""
  normed = MODEL.apply({'params': PARAMS}, state[:, None], index, method=Transformer.exit_hidden)
  return MODEL.apply({'params': PARAMS}, normed, method=Transformer.logits)[:, 0, :60]


def _check_propagated(new_cache, cache, tokens, positions, exit_at):
  """Every row's keys/values of blocks >= its exit E, at its token's slot, are what those
  blocks compute from the exit state (block E - 1's output); blocks below E are plain."""
  states = _exit_states(cache, tokens, positions)
  plain = MODEL.apply({'params': PARAMS}, tokens[:, None], positions[:, None], cache=cache).cache
  for b, e in enumerate(np.asarray(exit_at)):
    slot = int(positions[b])
    for layer in range(4):
      if layer < e:
        want_k, want_v = plain.k[layer, b, :, slot], plain.v[layer, b, :, slot]
      else:  # one block run on the exit state: its keys/values at the slot
        x = states[e - 1][:, None]
        _, ref, _ = MODEL.apply({'params': PARAMS}, x, positions[:, None], None, cache,
                                positions[:, None], start=layer, stop=layer + 1,
                                method=Transformer.blocks)
        want_k, want_v = ref.k[layer, b, :, slot], ref.v[layer, b, :, slot]
      np.testing.assert_allclose(new_cache.k[layer, b, :, slot], want_k, atol=1e-5)
      np.testing.assert_allclose(new_cache.v[layer, b, :, slot], want_v, atol=1e-5)


def test_threshold_zero_exits_first_and_propagates_the_exit_state():
  (token, exit_at, new_cache, blocks), cache, tokens, positions = _one_step(0.0)
  assert (np.asarray(exit_at) == 1).all() and int(blocks) == 1   # one block for the batch
  logits = _exit_logits(_exit_states(cache, tokens, positions)[0], 0)
  np.testing.assert_array_equal(token, np.argmax(logits, -1))
  _check_propagated(new_cache, cache, tokens, positions, exit_at)


def test_rows_exit_at_different_layers_in_one_step_and_decode_as_alone():
  """With a threshold between two rows' confidences at exit 1, one row exits there and
  the other runs on (its blocks take the exited row's exit state as input: the keys and
  values written for the exited row are still the propagated ones); each row of a batch
  decodes exactly as it does alone."""
  _, cache, tokens, positions = _one_step(1.0)
  logits = _exit_logits(_exit_states(cache, tokens, positions)[0], 0)
  conf = np.asarray(early_exit.confidence('softmax', logits, None, None, None))
  order = np.argsort(conf)
  threshold = float((conf[order[-1]] + conf[order[-2]]) / 2)
  (token, exit_at, new_cache, _), *_ = _one_step(threshold)
  exit_at = np.asarray(exit_at)
  assert exit_at[order[-1]] == 1 and (np.delete(exit_at, order[-1]) > 1).all()
  _check_propagated(new_cache, cache, tokens, positions, exit_at)
  config = _calm(threshold, max_new=10)
  batch = _decode(config)
  hist = np.asarray(batch.stats['exit_histogram'])
  assert (hist > 0).sum() >= 2
  for row in (order[-1], order[0]):   # the row that exits first, and another
    alone = _decode(config, [PROMPTS[row]])
    assert alone.completions()[0] == batch.completions()[row]


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  config = _calm(0.2, 'top2', max_new=8, sampling=SamplingConfig(temperature=1.0))
  single = _decode(config, prompts)
  out = generate_on_mesh(MODEL, PARAMS, prompts, config)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_array_equal(out.stats['exit_histogram'], single.stats['exit_histogram'])


def test_choose_threshold_is_fixed_sequence_testing():
  grid = (1.0, 0.9, 0.5, 0.1)
  rows = [[1, 1, 1], [1, 0.9, 0.8], [0.5, 0.6, 0.7], [0.99, 1, 1]]
  chosen, table = calibrate_exit.choose_threshold(grid, rows, 0.85)
  assert chosen == 0.9 and [p for *_, p in table] == [True, True, False, True]
  assert calibrate_exit.choose_threshold(grid, rows, 0.99)[0] == 1.0
  assert calibrate_exit.choose_threshold(grid, [[0.5]] * 4, 0.9)[0] is None
  # Learn-then-Test with Hoeffding: 3 prompts certify nothing; 200 perfect ones do.
  assert calibrate_exit.choose_threshold(grid, rows, 0.85, delta=0.1)[0] is None
  assert calibrate_exit.choose_threshold(grid[:1], [[1.0] * 200], 0.85, delta=0.1)[0] == 1.0
  for bad, message in ((dict(target=0.0), r'agreement=0.0 is outside'),
                       (dict(target=0.9, delta=1.0), r'delta=1.0 is outside'),
                       (dict(target=0.9, thresholds=(0.5, 0.9)), 'must decrease')):
    with pytest.raises(ValueError, match=message):
      calibrate_exit.choose_threshold(bad.pop('thresholds', grid), rows, **bad)


@pytest.fixture(scope='module')
def trained_early_exit(tfds_dir, tmp_path_factory):
  """A tiny byte-level early-exit LM (exits 1 and 2 of 3 blocks, LayerSkip recipe, per-
  exit norms) trained briefly, restored."""
  from configs import early_exit as early_exit_config
  from tests.conftest import _train_briefly
  config = early_exit_config.get_config('size=tiny,layers=3,exits=1+2,exit_norm=true')
  config.batch_size = 8
  metrics, restored = _train_briefly(config, tfds_dir, tmp_path_factory, 'early_exit',
                                     steps=30)
  assert {'loss', 'exit1_nll', 'exit2_nll', 'exit1_agree'} <= set(metrics)
  return restored


def test_calibration_meets_the_requested_agreement(trained_early_exit):
  """The chosen threshold meets the request on the calibration prompts, the next one on
  the grid does not (or the grid ends), and the held-out agreement is measured; the
  registry then decodes with it (LOSSY) when no threshold is given."""
  logs = []
  entry = calibrate_exit.calibrate(trained_early_exit, 0.8, num_prompts=3, prompt_len=12,
                                   max_new_tokens=8, thresholds=(1.0, 0.5, 0.0),
                                   log=logs.append)
  table = entry['calibration']
  passed = [row for row in table if row['passed']]
  assert passed[-1]['threshold'] == entry['threshold'] and passed[-1]['agreement'] >= 0.8
  assert table[-1]['passed'] is False or table[-1]['threshold'] == 0.0
  assert 0 <= entry['held_out_agreement'] <= 1
  calibrate_exit.save(trained_early_exit.workdir, entry)
  texts = ['import os', 'def f(']
  out = generation.decode_texts(trained_early_exit, texts, 'early_exit',
                                generation.DecodeOptions(max_new_tokens=8))
  assert out['stats']['threshold'] == entry['threshold'] and not out['stats']['lossless']
  assert sum(out['stats']['exit_histogram']) > 0


def test_trained_self_speculation_is_lossless(trained_early_exit):
  """LayerSkip self-speculation on the early-exit model: the draft is exit 1's head (its
  own norm), greedy tokens equal plain greedy decoding."""
  texts = ['import os', 'def f(', 'class A:']
  ar = generation.decode_texts(trained_early_exit, texts,
                               options=generation.DecodeOptions(max_new_tokens=12))
  for kw in (dict(exit_layer=1), {}):
    out = generation.decode_texts(trained_early_exit, texts, 'self_speculative',
                                  generation.DecodeOptions(max_new_tokens=12, **kw))
    assert [o['tokens'] for o in out['outputs']] == [o['tokens'] for o in ar['outputs']]
  config = registry.get('self_speculative').make_config(
      generation.DecodeOptions(), 32, (EOS,), trained_early_exit.model, None)
  proposer = config.proposer(trained_early_exit.model, None)
  assert proposer.exit_head == 1   # the model's exit nearest half depth, its own head


def test_trained_self_speculation_sampling_is_lossless(monkeypatch):
  """The exit head drafts (per-exit norm), the target verifies: exact in distribution
  (G-test against enumeration), and a wrong rule fails the same test."""
  model, params = _model(5, vocab=6, num_layers=2, exit_layers=(1,))
  rows, steps, prompt = 20_000, 3, [1, 3]
  sampling = SamplingConfig(temperature=1.0)
  exact = ts._exact_joint(model, params, prompt, steps, sampling, 6)
  config = SelfSpeculativeConfig(steps, len(prompt) + steps, eos_ids=(), sampling=sampling,
                                 skip_layers=(1,), num_draft=2)
  assert config.proposer(model, None).exit_head == 1

  def sample():
    out = driver.generate(model, params, jnp.asarray([prompt] * rows),
                          jnp.full((rows,), len(prompt), jnp.int32), config,
                          jax.random.PRNGKey(11))
    return np.asarray(out.tokens[:, len(prompt):])

  assert ts._g_test(sample(), exact) > 1e-3
  ts._wrong_rule_fails(monkeypatch, sample, exact)


def test_bad_input_is_a_clear_error():
  make = registry.get('early_exit').make_config
  options = generation.DecodeOptions
  for kw, message in ((dict(exit_threshold=1.5), r'threshold=1.5 is outside \[0, 1\]'),
                      (dict(exit_threshold=-0.1), r'threshold=-0.1 is outside \[0, 1\]'),
                      (dict(exit_confidence='entropy'), "Unknown confidence measure 'entropy'"),
                      (dict(exit_layers='4'), r'exit layer 4 is outside \[1, 4\)'),
                      (dict(exit_layers='0'), r'exit layer 0 is outside \[1, 4\)'),
                      (dict(exit_layers='x'), 'expected block indices')):
    with pytest.raises(ValueError, match=message):
      make(options(**kw), 32, (EOS,), MODEL, None)
  two, _ = _model(num_layers=4, exit_layers=(2,))
  with pytest.raises(ValueError, match='Exit layer 3 has no exit head'):
    make(options(exit_layers='3'), 32, (EOS,), two, None)
  plain = Transformer(TransformerConfig(vocab_size=60, num_layers=4))
  with pytest.raises(ValueError, match='needs a model with exit heads'):
    registry.get('early_exit').check_model(plain)
  with pytest.raises(ValueError, match=r'exit layer 4 is outside \[1, 4\)'):
    TransformerConfig(vocab_size=60, num_layers=4, exit_layers=(2, 4))
  with pytest.raises(ValueError, match='--exit_threshold is an option of early_exit'):
    registry.check_options(registry.get('lookup'), options(exit_threshold=0.5))
  from training.objectives import early_exit as objective
  with pytest.raises(ValueError, match='needs model.exit_layers'):
    objective.EarlyExitObjective(TransformerConfig(vocab_size=60, num_layers=4))
