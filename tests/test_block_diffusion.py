"""Block diffusion (BD3-LM): the mask and objective (block size 1 is AR), the vectorized
training forward vs blocks run with the cache, the KV-cached sampler vs the uncached one,
denoising invariants, EOS, batch rows vs alone, schedules, 8 devices, bad input."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import block_diffusion as bd, driver, registry
from decoding.autoregressive import AutoregressiveConfig
from decoding.sampling import SamplingConfig
from models import BlockDiffusionLM, KVCache, Transformer, TransformerConfig, masks, sharding
from models.block_diffusion import NoiseSchedule
from training.objectives import block_diffusion as objective_lib

VOCAB = 24        # the tokenizer's; the model adds [MASK] = 24
TRUNK = TransformerConfig(vocab_size=VOCAB + 1, num_layers=2, d_model=32, num_heads=4,
                          num_kv_heads=2, head_dim=8, mlp_dim=64)


@functools.lru_cache(maxsize=None)
def _model(block_size, scale=3.0):
  model = BlockDiffusionLM(TRUNK, block_size=block_size)
  z = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda key: model.init(key, z, z)['params'])(jax.random.PRNGKey(block_size))
  # Sharper logits than at init, so sampled tokens depend on the context (scale 1 where
  # logits are compared to 1e-5: the sharper model amplifies float32 summation order).
  params = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)
  return model, params


def _batch(rows=2, length=16, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, VOCAB, (rows, length)).astype(np.int32)
  ones = np.ones((rows, length), np.int32)
  return {'inputs': inputs, 'targets': np.roll(inputs, -1, 1), 'segment_ids': ones,
          'positions': np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32),
          'loss_mask': ones, 'target_bytes': ones}


def test_block_size_one_loss_is_the_autoregressive_cross_entropy():
  """t = 1 masks every scored token with weight 1: the bound is then exactly the AR
  cross-entropy of [MASK]-at-l over the clean prefix, computed here by the plain causal
  mask, one position at a time (pins the BD3-LM mask and the objective together)."""
  model, params = _model(1)
  objective = objective_lib.BlockDiffusionObjective(TRUNK, 1, 16, NoiseSchedule(eps=0.0))
  batch = _batch()
  terms = jax.jit(objective.token_bound, static_argnums=3)(params, batch, jax.random.PRNGKey(0),
                                                           (1.0, 1.0))
  loss, sums = jax.jit(objective.loss)(params, batch, jax.random.PRNGKey(0), 0)
  assert float(sums['tokens']) == 2 * 15
  # Row (l, b): batch row b with token l replaced by [MASK]; one causal forward for all.
  tokens = np.repeat(batch['inputs'][None], 16, 0)                       # [16, 2, 16]
  tokens[np.arange(16), :, np.arange(16)] = model.mask_id
  logits = model.apply({'params': params}, tokens.reshape(32, 16),
                       np.tile(batch['positions'], (16, 1)), masks.causal_mask(32, 16)).logits
  logits = logits.reshape(16, 2, 16, -1)[np.arange(16), :, np.arange(16)]  # [16 (l), 2, V]
  logp = np.asarray(jax.nn.log_softmax(model.denoiser_logits(logits), -1))
  expected = -np.take_along_axis(logp, batch['inputs'].T[..., None], -1)[..., 0].T  # [2, 16]
  expected[:, 0] = 0.0   # the row's first token is context, not scored
  np.testing.assert_allclose(terms, expected, rtol=1e-5, atol=1e-5)
  assert np.isfinite(float(loss))


@pytest.mark.parametrize('block_size', [4, 8, 16])
def test_vectorized_training_forward_equals_blocks_with_the_cache(block_size):
  model, params = _model(block_size, scale=1.0)
  clean = _batch(2, 32, seed=1)['inputs']
  noised = np.where(np.random.default_rng(2).random(clean.shape) < 0.5, model.mask_id, clean)
  positions = np.broadcast_to(np.arange(32), (2, 32)).astype(np.int32)
  vectorized = model.apply({'params': params}, noised, clean, positions, np.ones_like(clean),
                           method=BlockDiffusionLM.training_logits)

  @jax.jit
  def block_call(tokens, c, cache):
    """Block c's tokens [2, K] fed into the cache (block mask, its slots written)."""
    slots = jnp.broadcast_to(c * block_size + jnp.arange(block_size), (2, block_size))
    starts = jnp.full((2,), c * block_size)
    out = model.apply({'params': params}, tokens, slots,
                      masks.block_slot_mask(starts, block_size, 32), cache, write_slots=slots)
    return model.denoiser_logits(out.logits), out.cache.keep(starts + block_size)

  for b in range(32 // block_size):
    cache = KVCache.empty(model.config, 2, 32)
    for c in range(b + 1):
      source = noised if c == b else clean
      logits, written = block_call(source[:, c * block_size:(c + 1) * block_size], c, cache)
      if c < b:  # A clean block: keep its keys.
        cache = written
    np.testing.assert_allclose(
        logits[:, :, :VOCAB],
        vectorized[:, b * block_size:(b + 1) * block_size, :VOCAB], rtol=1e-5, atol=1e-5)


def _generate(block_size, prompts, max_new=14, capacity=40, seed=0, **kw):
  model, params = _model(block_size)
  kw.setdefault('sampling', SamplingConfig(temperature=1.0, top_p=0.9))
  kw.setdefault('eos_ids', ())
  config = bd.BlockDiffusionConfig(max_new_tokens=max_new, cache_capacity=capacity, **kw)
  padded, lengths = driver.pad_prompts(prompts)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3]]


@pytest.mark.parametrize('sampler,steps', [('ancestral', 3), ('first_hitting', None)])
def test_cached_sampler_equals_the_uncached_one(sampler, steps):
  cached = _generate(4, PROMPTS, sampler=sampler, steps=steps)
  uncached = _generate(4, PROMPTS, sampler=sampler, steps=steps, use_cache=False)
  assert cached.completions() == uncached.completions()
  assert [len(c) for c in cached.completions()] == [14, 14, 14]
  np.testing.assert_array_equal(cached.stats['nfe'], uncached.stats['nfe'])
  # first-hitting: one call per unmasked token plus one KV write per kept block.
  if sampler == 'first_hitting':
    assert int(cached.stats['nfe'][2]) >= 14


def test_only_masked_positions_change_and_finished_blocks_stay():
  model, params = _model(4)
  config = bd.BlockDiffusionConfig(max_new_tokens=13, cache_capacity=32, steps=3,
                                   sampling=SamplingConfig(temperature=1.0), eos_ids=())
  padded, lengths = map(jnp.asarray, driver.pad_prompts(PROMPTS))
  state = bd.start_state(model, params, padded, lengths, config, jax.random.PRNGKey(3))
  step = jax.jit(bd.step_fn(model, params, config, lengths))
  blocks_seen = 0
  while not bool(jnp.all(state.done)):
    new = step(state)
    for b in range(3):
      if bool(state.done[b]):
        continue
      kept = int(state.cache.lengths[b])
      # Committed tokens and kept cache slots are never rewritten.
      np.testing.assert_array_equal(new.tokens[b, :int(state.lengths[b])],
                                    state.tokens[b, :int(state.lengths[b])])
      np.testing.assert_array_equal(new.cache.k[:, b, :, :kept], state.cache.k[:, b, :, :kept])
      if int(new.start[b]) == int(state.start[b]):
        unmasked = np.asarray(state.block[b] != model.mask_id)
        np.testing.assert_array_equal(np.asarray(new.block[b])[unmasked],
                                      np.asarray(state.block[b])[unmasked])
      else:
        blocks_seen += 1
        assert int(new.cache.lengths[b]) == int(new.start[b]) == int(state.start[b]) + 4
    state = new
  assert blocks_seen >= 6


def test_eos_ends_a_row():
  free = _generate(4, [PROMPTS[0]], sampling=SamplingConfig(), sampler='ancestral', steps=1)
  tokens = free.completions()[0]
  eos = tokens[6]
  first = tokens.index(eos)
  stopped = _generate(4, [PROMPTS[0]], sampling=SamplingConfig(), sampler='ancestral',
                      steps=1, eos_ids=(eos,))
  assert stopped.completions()[0] == tokens[:first + 1]
  assert stopped.finish_reasons()[0] == {'reason': 'stop', 'stop_id': eos}


def test_a_batch_row_equals_the_prompt_alone():
  """Greedy with one step per block (every masked token revealed at once: no random
  order), rows at different blocks and phases."""
  kw = dict(sampling=SamplingConfig(), steps=1)
  together = _generate(4, PROMPTS, **kw).completions()
  for row, prompt in enumerate(PROMPTS):
    assert _generate(4, [prompt], **kw).completions()[0] == together[row]


def test_eight_devices_give_the_tokens_of_one():
  model, params = _model(4)
  prompts = PROMPTS + [[4, 4], [7] * 5, [9, 3, 9], [11] * 8, [5]]
  padded, lengths = driver.pad_prompts(prompts)
  config = bd.BlockDiffusionConfig(max_new_tokens=10, cache_capacity=24, steps=2,
                                   sampling=SamplingConfig(temperature=1.0, top_p=0.9),
                                   eos_ids=())
  one = driver.generate(model, params, padded, lengths, config, jax.random.PRNGKey(1))
  mesh = sharding.make_mesh(model_parallelism=2)
  with jax.set_mesh(mesh):
    eight = driver.generate(model, jax.device_put(params, sharding.param_shardings(model, mesh)),
                            jax.device_put(padded, sharding.batch_sharding(mesh, 2)),
                            jax.device_put(lengths, sharding.batch_sharding(mesh, 1)),
                            config, jax.random.PRNGKey(1))
  assert one.completions() == eight.completions()


def test_sharded_train_step_matches_single_device():
  from configs import bd3lm
  from training import trainer
  config = bd3lm.get_config('size=tiny,block=4')
  config.batch_size, config.seq_len, config.warmup_steps = 8, 16, 1
  objective = objective_lib.build(config, VOCAB)
  batch = _batch(8, 16)
  results = []
  for devices, model_parallelism in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    config.model_parallelism = model_parallelism
    setup = trainer.build(config, objective, batch, devices)
    state = setup.init_state()
    state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                      setup.frozen)
    results.append((jax.device_get(state.params), float(metrics['loss'])))
  (single, loss1), (sharded, loss8) = results
  assert np.isclose(loss1, loss8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('kind', ['loglinear', 'cosine', 'clipped'])
def test_schedule_weights_follow_the_elbo_formula(kind):
  """w(t) = -alpha'(t) / (1 - alpha(t)) (derivative by autodiff), and with one token per
  block E_t[w(t) (1 - alpha_t)] = integral of -alpha' = alpha_0 - alpha_1 (trapezoid)."""
  schedule = NoiseSchedule(kind)
  grid = jnp.linspace(0.01, 0.99, 99)   # float32: away from 0, where 1 - alpha cancels
  derivative = jax.vmap(jax.grad(schedule.alpha))(grid)
  np.testing.assert_allclose(schedule.weight(grid), -derivative / (1 - schedule.alpha(grid)),
                             rtol=1e-4)
  t = np.linspace(1e-4, 1.0 - 1e-4, 200_001)
  integrand = np.asarray(schedule.weight(t) * (1 - schedule.alpha(t)), np.float64)
  integral = np.trapezoid(integrand, t)
  assert abs(integral - (schedule.alpha(1e-4) - schedule.alpha(1 - 1e-4))) < 1e-4
  assert abs(integral - (1.0 - float(schedule.alpha(1.0)))) < 1e-3


def test_clipped_schedule_stays_in_its_interval():
  schedule = NoiseSchedule('clipped', beta=0.3, omega=0.8)
  objective = objective_lib.BlockDiffusionObjective(TRUNK, 4, 16, schedule)
  batch = _batch(8, 64)
  rates = []
  for seed in range(20):
    t = objective_lib.block_times(jax.random.PRNGKey(seed), 8, 16, *schedule.train_range())
    assert float(t.min()) >= 0.3 and float(t.max()) <= 0.8
    _, masked, _ = objective.noised(batch, jax.random.PRNGKey(seed), schedule.train_range())
    rates.append(float(masked[:, 1:].mean()))
  assert 0.5 < np.mean(rates) < 0.6     # E[mask rate] = (0.3 + 0.8) / 2
  lo, hi = schedule.eval_range()
  assert lo < 0.01 and hi == 1.0


def test_clip_search_picks_the_lowest_variance_interval():
  model, params = _model(4)
  objective = objective_lib.BlockDiffusionObjective(TRUNK, 4, 16)
  found = objective_lib.clip_search(objective, params, [_batch(4, 16)], jax.random.PRNGKey(0),
                                    candidates=[(0.0, 1.0), (0.4, 0.6)])
  variances = {(b, o): v for b, o, _, v in found['table']}
  assert (found['beta'], found['omega']) == min(variances, key=variances.get)
  assert found['variance'] == min(variances.values()) and len(set(variances.values())) == 2


def test_bad_input_is_refused_with_one_line():
  from configs import bd3lm
  with pytest.raises(ValueError, match='does not divide'):
    bd3lm.get_config('size=tiny,block=5')
  with pytest.raises(ValueError, match='does not divide the training sequence length'):
    objective_lib.BlockDiffusionObjective(TRUNK, 5, 16)
  for steps in (0, -2):
    with pytest.raises(ValueError, match='diffusion_steps must be > 0'):
      bd.BlockDiffusionConfig(max_new_tokens=4, cache_capacity=16, steps=steps)
  model, params = _model(4)
  padded, lengths = driver.pad_prompts([[5, 6]])
  with pytest.raises(ValueError, match='decode it with --method=block_diffusion'):
    driver.generate(model, params, padded, lengths, AutoregressiveConfig(4, 16),
                    jax.random.PRNGKey(0))
  ar = Transformer(dataclasses.replace(TRUNK, vocab_size=VOCAB))
  ar_params = jax.jit(ar.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                               jnp.zeros((1, 1), jnp.int32))['params']
  with pytest.raises(ValueError, match='decodes a block diffusion model'):
    driver.generate(ar, ar_params, padded, lengths,
                    bd.BlockDiffusionConfig(max_new_tokens=4, cache_capacity=16),
                    jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='decodes a block diffusion model'):
    registry.get('block_diffusion').check_model(ar)


def test_the_objective_trains_the_family_map_module():
  """configs/bd3lm.py -> the family map's BlockDiffusionLM (vocabulary + the mask token),
  whose parameters the objective initialises and checkpoints restore."""
  import flax.linen as nn
  from configs import bd3lm
  from models import families
  from training import objectives
  config = bd3lm.get_config('size=tiny,block=8')
  objective = objectives.build(config, VOCAB)
  module = families.build_module(config, VOCAB)
  assert objective.model == module and module.block_size == 8 and module.mask_id == VOCAB
  shapes = jax.tree.map(lambda x: x.shape, families.abstract_params(config, VOCAB))
  assert shapes == jax.tree.map(lambda x: x.shape, nn.meta.unbox(
      jax.eval_shape(objective.init, jax.random.PRNGKey(0), objective.example_batch())))
  assert shapes['embedding'][0] == module.config.padded_vocab_size >= VOCAB + 1


def test_bench_rows_of_models_of_other_families(trained_tiny, tfds_dir, tmp_path):
  """launch.bench with block_diffusion and assd, each on its own model. BD3-LM has no AR
  decoding of its own: its rows are measured against the target's AR (an AR model of the
  same size) with NFE per token and the generative perplexity of its samples under the
  target. ASSD's rows are measured against sequential any-order decoding of its AS-ARM
  (the decoding it is exact with respect to)."""
  from configs import asarm, bd3lm
  from configs import bench as bench_config
  from launch import benchmarking
  from training import trainer
  for name, config in (('bd3', bd3lm.get_config('size=tiny,block=4')),
                       ('asarm', asarm.get_config('size=tiny'))):
    config.data.data_dir = tfds_dir
    config.num_train_steps, config.seq_len, config.warmup_steps = 2, 32, 1
    config.eval_every_steps = config.checkpoint_every_steps = 2
    config.eval_batches = 1
    trainer.train(config, str(tmp_path / name), progress=False)
  bench = bench_config.get_config()
  bench.target_workdir = trained_tiny.workdir
  bench.methods = ('autoregressive', 'block_diffusion', 'assd')
  bench.workdirs.block_diffusion = str(tmp_path / 'bd3')
  bench.workdirs.assd = str(tmp_path / 'asarm')
  bench.num_draft = 3
  bench.batch_sizes, bench.temperatures = (2,), (1.0,)
  bench.num_prompts, bench.prompt_len, bench.max_new_tokens, bench.repeats = 2, 8, 8, 1
  bench.naive_reference = bench.verify_cost = False
  bench.weight_layout = 'per_block'   # one device, as on a CPU: cached programs (conftest)
  records = benchmarking.run(bench, str(tmp_path / 'bench'))
  ar, bd3, any_order, assd = records
  assert [r['method'] for r in records] == ['autoregressive', 'block diffusion (BD3-LM)',
                                            'any-order (sequential)', 'ASSD']
  assert bd3['lossless'] is False and bd3['matches_ar'] is None
  assert bd3['speedup_vs_ar'] == bd3['tokens_per_s'] / ar['tokens_per_s']
  assert 0 < bd3['nfe_per_token'] <= 2 and bd3['gen_ppl'] > 1 and bd3['entropy_bits'] >= 0
  assert ar['gen_ppl'] > 1                  # the target's own samples, the reference
  # A block's first token has no latency of its own: no prefill / decode split.
  assert 'decode_tokens_per_s' in ar and 'decode_tokens_per_s' not in bd3
  assert any_order['speedup_vs_ar'] == 1.0 and assd['lossless'] is True
  assert assd['speedup_vs_ar'] == assd['tokens_per_s'] / any_order['tokens_per_s']
  assert any_order['nfe_per_token'] == 1.0 and 0 < assd['nfe_per_token'] <= 1.0
  assert 'gen_ppl' in (tmp_path / 'bench' / 'bench.md').read_text()
