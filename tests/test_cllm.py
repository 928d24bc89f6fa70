"""Consistency training (CLLM): the loss on hand-built inputs, the sharded training step,
and collect -> train -> restore -> decode on a trained tiny target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar_lm, cllm
from launch import benchmarking, generation, trajectories
from training import checkpoints, data, objectives, trainer
from training.objectives import consistency
from tests.params import init as params_init

VOCAB = 259  # the byte tokenizer's


def _objective(**kwargs):
  config = ar_lm.get_config('size=tiny')
  return consistency.ConsistencyObjective(objectives.transformer_config(config, VOCAB), **kwargs)


def _params(objective, seed=0):
  import flax.linen as nn
  return params_init(objective, seed, None)


def _record_batch(rng, lengths, width, n, num_states):
  """Random contexts of `lengths` (right-padded to `width`), fixed points and states."""
  batch = len(lengths)
  context = rng.integers(3, VOCAB, (batch, width)).astype(np.int32)
  context[np.arange(width)[None] >= np.asarray(lengths)[:, None]] = 0
  fixed = rng.integers(3, VOCAB, (batch, n)).astype(np.int32)
  states = rng.integers(3, VOCAB, (batch, num_states, n)).astype(np.int32)
  return {'context': context, 'context_lengths': np.asarray(lengths, np.int32),
          'states': states, 'fixed_point': fixed,
          'iterations': np.full(batch, num_states, np.int32),
          'block_mask': np.ones((batch, n), np.int32)}


def _direct(objective, params, context, block):
  """Log-probs [n, V] predicting each block token: one unpadded causal forward pass."""
  tokens = jnp.asarray(np.concatenate([context, block]))[None]
  positions = jnp.arange(tokens.shape[1])[None]
  logits = jax.jit(objective.model.apply)({'params': params}, tokens, positions).logits[0]
  return jax.nn.log_softmax(logits[len(context) - 1:len(context) - 1 + len(block)], -1)


def test_consistency_loss_is_the_forward_kl_to_the_fixed_point():
  objective = _objective(ar_weight=10.0, label_smoothing=0.0)
  params = _params(objective)
  loss_fn = jax.jit(objective.loss)
  rng = np.random.default_rng(0)
  lengths, n = [3, 6, 1], 5
  batch = _record_batch(rng, lengths, width=6, n=n, num_states=1)
  batch['states'][0, 0, :2] = batch['fixed_point'][0, :2]  # first mismatch at 2 in row 0
  batch['block_mask'][2, 3:] = 0                           # an EOS at position 2 of row 2
  loss, sums = loss_fn(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0),
                       jnp.zeros((), jnp.int32))
  kl_sum = positions = nll_sum = 0.0
  for b, length in enumerate(lengths):
    context = batch['context'][b, :length]
    full = _direct(objective, params, context, batch['fixed_point'][b])  # one pass, two uses
    teacher = jax.nn.log_softmax(full[:, :VOCAB], -1)
    student = jax.nn.log_softmax(
        _direct(objective, params, context, batch['states'][b, 0])[:, :VOCAB], -1)
    kl = np.sum(np.exp(teacher) * (teacher - student), -1)
    nll = -np.take_along_axis(np.asarray(full), batch['fixed_point'][b][:, None], 1)[:, 0]
    first = int(np.argmax(batch['states'][b, 0] != batch['fixed_point'][b]))
    mask = (np.arange(n) >= first) & (batch['block_mask'][b] > 0)
    kl_sum += float(np.sum(kl * mask))
    positions += float(mask.sum())
    nll_sum += float(np.sum(nll * batch['block_mask'][b]))
  assert float(sums['consistency_positions']) == positions == 3 + 5 + 3
  assert float(sums['tokens']) == 5 + 5 + 3
  np.testing.assert_allclose(float(sums['consistency_sum']), kl_sum, rtol=1e-4)
  np.testing.assert_allclose(float(sums['nll_sum']), nll_sum, rtol=1e-5)
  np.testing.assert_allclose(float(loss), kl_sum / positions + 10.0 * nll_sum / 13, rtol=1e-5)
  assert kl_sum > 0.1


def test_consistency_loss_is_zero_when_states_give_the_fixed_points_distributions():
  objective = _objective(ar_weight=0.0)
  params = _params(objective)
  loss_fn = jax.jit(objective.loss)  # one program for both batches below
  batch = _record_batch(np.random.default_rng(1), [2, 4], width=4, n=4, num_states=3)
  # Every state differs from the fixed point in its last token only, which no block
  # position reads: the student sees the fixed point's inputs, so its KL is exactly 0
  # (a cross-entropy would not be 0 here), though each row has a state to learn from.
  batch['states'][:] = batch['fixed_point'][:, None]
  batch['states'][:, :, -1] = (batch['fixed_point'][:, None, -1] + 1 + np.arange(3)) % VOCAB
  loss, sums = loss_fn(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0),
                       jnp.zeros((), jnp.int32))
  assert float(sums['consistency_positions']) == 2  # position n - 1 of each row
  assert abs(float(loss)) < 1e-6 and abs(float(sums['consistency_sum'])) < 1e-6
  # States equal to the fixed point carry no consistency loss at all.
  batch['states'][:] = batch['fixed_point'][:, None]
  loss, sums = loss_fn(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0),
                       jnp.zeros((), jnp.int32))
  assert float(loss) == 0.0 and float(sums['consistency_positions']) == 0


def test_a_state_is_drawn_uniformly_among_those_off_the_fixed_point():
  fixed = jnp.asarray([[5, 6], [7, 8]])
  states = jnp.asarray([[[5, 6], [1, 6], [5, 6], [2, 2]],      # row 0: states 1 and 3
                        [[7, 8], [7, 8], [7, 8], [7, 8]]])     # row 1: none
  picked = []
  for seed in range(200):
    state, has = consistency.pick_states(states, fixed, jax.random.PRNGKey(seed))
    picked.append(tuple(np.asarray(state[0])))
    assert list(np.asarray(has)) == [True, False] and list(np.asarray(state[1])) == [7, 8]
  counts = {s: picked.count(s) for s in set(picked)}
  assert set(counts) == {(1, 6), (2, 2)} and min(counts.values()) > 70


def test_training_step_on_8_devices_equals_one(tiny_config):
  assert jax.device_count() == 8
  objective = _objective()
  batch = _record_batch(np.random.default_rng(2), [3, 5, 2, 6, 4, 1, 6, 3], width=6, n=4,
                        num_states=3)
  results = []
  for devices, model_parallelism in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    tiny_config.model_parallelism = model_parallelism
    setup = trainer.build(tiny_config, objective, batch, devices)
    state = setup.init_state()
    for _ in range(2):
      state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                        setup.frozen)
    results.append((jax.device_get(state.params), float(metrics['loss']),
                    float(metrics['consistency_sum'])))
  (single, loss1, cons1), (sharded, loss8, cons8) = results
  assert np.isclose(loss1, loss8, rtol=1e-5) and np.isclose(cons1, cons8, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_collect_train_restore_and_decode(trained_tiny, tfds_dir, tmp_path):
  prompts = benchmarking.validation_prompts(trained_tiny, 8, 12)
  arrays = trajectories.collect(trained_tiny, prompts, block_size=6, num_blocks=2,
                                batch_size=8, seed=0)
  stats = trajectories.summary(arrays)
  assert stats['records'] <= 16 and arrays['states'].shape[1:] == (7, 6)
  assert 0 < stats['iterations_per_block'] <= 6
  # Every fixed point is the target's own greedy continuation of its context.
  ar, _ = generation.decode_tokens(trained_tiny, prompts, 'autoregressive',
                                   generation.DecodeOptions(max_new_tokens=12))
  for r in range(stats['records']):
    length = int(arrays['context_lengths'][r])
    context = arrays['context'][r, :length].tolist()
    b = next(i for i, p in enumerate(prompts) if context[:len(p)] == p)
    produced = context[len(prompts[b]):] + arrays['fixed_point'][r].tolist()
    mask = arrays['block_mask'][r] > 0
    assert produced[:len(produced) - 6 + int(mask.sum())] == ar[b][:len(produced) - 6
                                                                    + int(mask.sum())]
  dataset = str(tmp_path / 'jacobi')
  data.save_trajectories(dataset, arrays, {'target_workdir': trained_tiny.workdir})
  assert data.TrajectorySource(dataset)[0]['states'].shape == (7, 6)

  config = cllm.get_config('size=tiny')
  config.init_from = trained_tiny.workdir
  config.cllm.trajectories = dataset
  config.data.data_dir = tfds_dir
  config.num_train_steps = 6
  config.batch_size = 8
  config.seq_len = 64
  config.eval_every_steps = config.checkpoint_every_steps = 6
  config.eval_batches = 1
  workdir = str(tmp_path / 'cllm')
  result = trainer.train(config, workdir, progress=False)
  (_, before), (_, after) = result.eval_history
  assert np.isfinite(after['loss']) and abs(after['loss'] - before['loss']) < 0.5
  restored = checkpoints.restore_model(workdir)
  assert restored.config.family == 'cllm' and restored.step == 6
  assert type(restored.model) is type(trained_tiny.model)

  # A plain LM: greedy Jacobi decoding equals its own autoregressive decoding.
  options = generation.DecodeOptions(max_new_tokens=20)
  ar, _ = generation.decode_tokens(restored, prompts[:4], 'autoregressive', options)
  jac, stats = generation.decode_tokens(restored, prompts[:4], 'jacobi', options)
  assert jac == ar


def test_bad_settings_are_one_line_errors(trained_tiny, tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    consistency.build(cllm.get_config('size=tiny'), VOCAB)
  config = cllm.get_config('size=tiny')
  config.init_from = trained_tiny.workdir
  with pytest.raises(ValueError, match='trajectories'):
    consistency.build(config, VOCAB).train_dataset(8, 0, 0, 1)
  with pytest.raises(FileNotFoundError, match='collect_jacobi'):
    data.TrajectorySource(str(tmp_path))
  with pytest.raises(ValueError, match='block_size'):
    trajectories.collect(trained_tiny, [[1, 2]], block_size=0, num_blocks=1)
