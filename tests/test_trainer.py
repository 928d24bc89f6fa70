"""The one trainer: learning, determinism, exact resume, sharding, failures with clear errors."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import checkpoints, objectives, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(Exception):
  """Raised by a step callback to stand in for a killed process."""


class Recorder:
  """Step callback keeping each step's loss and batch, optionally 'killing' the run."""

  def __init__(self, kill_after=None):
    self.losses, self.batches, self.kill_after = {}, {}, kill_after

  def __call__(self, step, metrics, batch):
    self.losses[step] = float(metrics['loss'])
    self.batches[step] = batch['inputs'].copy()
    if step == self.kill_after:
      raise Killed()


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_training_on_the_embedded_corpus_lowers_validation_loss(tiny_config, tmp_path):
  tiny_config.num_train_steps = 60
  tiny_config.eval_every_steps = 60
  tiny_config.checkpoint_every_steps = 60
  tiny_config.learning_rate = 1e-2
  result = trainer.train(tiny_config, str(tmp_path), progress=False)
  (first_step, first), (last_step, last) = result.eval_history[0], result.eval_history[-1]
  assert (first_step, last_step) == (0, 60)
  assert last['loss'] < first['loss'] - 1.5, result.eval_history
  assert last['bits_per_byte'] < 0.8 * first['bits_per_byte']
  assert np.isclose(last['perplexity'], np.exp(last['loss']))
  assert os.listdir(tmp_path / 'tb'), 'TensorBoard event files are written'
  assert result.compile_s > 0 and result.tokens_per_s > 0


def test_identical_runs_give_identical_losses(tiny_config, tmp_path):
  runs = [Recorder(), Recorder()]
  for i, recorder in enumerate(runs):
    trainer.train(tiny_config, str(tmp_path / f'run{i}'), step_callback=recorder, progress=False)
  assert runs[0].losses == runs[1].losses and len(runs[0].losses) == 8


def test_killed_run_resumes_exactly(tiny_config, tmp_path):
  straight = Recorder()
  expected = trainer.train(tiny_config, str(tmp_path / 'straight'), step_callback=straight,
                           progress=False)
  killed = Recorder(kill_after=6)  # Last checkpoint at step 4; steps 5 and 6 are lost.
  with pytest.raises(Killed):
    trainer.train(tiny_config, str(tmp_path / 'killed'), step_callback=killed, progress=False)
  resumed = Recorder()
  result = trainer.train(tiny_config, str(tmp_path / 'killed'), step_callback=resumed,
                         progress=False)
  assert sorted(resumed.batches) == [5, 6, 7, 8]
  for step in resumed.batches:
    np.testing.assert_array_equal(resumed.batches[step], straight.batches[step])
    assert resumed.losses[step] == straight.losses[step]
  _assert_trees_equal(_params(result.state), _params(expected.state))  # Bitwise.


def test_half_written_checkpoint_is_ignored(tiny_config, tmp_path):
  workdir = str(tmp_path)
  trainer.train(tiny_config, workdir, progress=False)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  # What a save killed midway leaves: orbax's temporary folder, partly written.
  partial = os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(ckpt_dir, '8'), partial)
  shutil.rmtree(os.path.join(partial, 'state'))
  tiny_config.num_train_steps = 12
  recorder = Recorder()
  result = trainer.train(tiny_config, workdir, step_callback=recorder, progress=False)
  assert min(recorder.losses) == 9, 'resumed from step 8, the last complete checkpoint'
  assert int(result.state.step) == 12


def test_raising_num_train_steps_continues_a_finished_run(tiny_config, tmp_path):
  trainer.train(tiny_config, str(tmp_path), progress=False)
  tiny_config.num_train_steps = 10
  recorder = Recorder()
  result = trainer.train(tiny_config, str(tmp_path), step_callback=recorder, progress=False)
  assert sorted(recorder.losses) == [9, 10] and int(result.state.step) == 10


def test_sharded_train_step_matches_single_device(tiny_config, tmp_path):
  assert jax.device_count() == 8
  from training import data, tokenizers
  tokenizer = tokenizers.ByteTokenizer()
  sources = data.load_sources(tiny_config.data)
  batch = next(iter(data.train_dataset(sources['train'], tokenizer, batch_size=8, seq_len=64,
                                       seed=0)))
  objective = objectives.build(tiny_config, tokenizer.vocab_size)
  results = []
  for devices, model_parallelism in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    tiny_config.model_parallelism = model_parallelism
    setup = trainer.build(tiny_config, objective, batch, devices)
    state = setup.init_state()
    if model_parallelism == 2:
      q = state.params['layers']['attention']['q']                        # [L, D, N, H]
      assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, 'model', None)
    for _ in range(2):
      state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                        setup.frozen)
    results.append((_params(state), float(metrics['loss'])))
  (single, loss1), (sharded, loss8) = results
  assert np.isclose(loss1, loss8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


class NaNAfter(objectives.LanguageModelObjective):
  """The LM objective, but its loss turns NaN from step `bad_step` on."""

  def __init__(self, model_config, bad_step):
    super().__init__(model_config)
    self.bad_step = bad_step

  def loss(self, params, batch, rng, step, frozen=None):
    loss, sums = super().loss(params, batch, rng, step, frozen)
    return jnp.where(step >= self.bad_step, jnp.nan, loss), sums


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  objective = NaNAfter(objectives.transformer_config(tiny_config, 259), bad_step=5)
  with pytest.raises(trainer.TrainingDivergedError,
                     match=r'non-finite at step 6.*last good checkpoint is step 4'):
    trainer.train(tiny_config, str(tmp_path), objective=objective, progress=False)
  manager = checkpoints.make_manager(str(tmp_path), save_every=4, keep=3)
  assert manager.all_steps() == [4]
  restored = manager.restore(4)['state']
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored['params']))
  manager.close()


def test_workdir_of_a_different_model_is_refused(tiny_config, tmp_path):
  trainer.train(tiny_config, str(tmp_path), progress=False)
  tiny_config.model.d_model = 32
  with pytest.raises(checkpoints.ConfigMismatchError,
                     match=r'different model config:\n  model.d_model: checkpoint has 64, '
                           r'config has 32'):
    trainer.train(tiny_config, str(tmp_path), progress=False)


def test_missing_tokenizer_is_a_clear_error(tiny_config, tmp_path):
  trainer.train(tiny_config, str(tmp_path), progress=False)
  os.remove(tmp_path / 'tokenizer.json')
  tiny_config.num_train_steps = 10
  with pytest.raises(FileNotFoundError, match='Tokenizer file missing'):
    trainer.train(tiny_config, str(tmp_path), progress=False)


def _launch_train(tfds_dir, workdir, *overrides):
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/ar_lm.py:size=tiny',
         f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
         '--config.num_train_steps=4', '--config.seq_len=32', '--config.eval_batches=1',
         '--config.warmup_steps=1', *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_launch_train_command_line(tfds_dir, tmp_path):
  done = _launch_train(tfds_dir, tmp_path / 'run')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Finished at step 4' in done.stdout
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '4')
  bad = _launch_train(tfds_dir, tmp_path / 'bad', '--config.no_such_key=3')
  assert bad.returncode != 0
  assert "Unknown config key 'no_such_key'" in bad.stderr and 'Traceback' not in bad.stderr
  bad_arg = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=configs/ar_lm.py:sise=tiny',
       f'--workdir={tmp_path}/x'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad_arg.returncode != 0 and "Unknown config argument 'sise=tiny'" in bad_arg.stderr
  other_model = _launch_train(tfds_dir, tmp_path / 'run', '--config.model.num_layers=3')
  assert other_model.returncode != 0 and 'Traceback' not in other_model.stderr
  assert 'model.num_layers: checkpoint has 2, config has 3' in other_model.stderr
