"""Multi-process runs (jax.distributed over loopback, launch.local_cluster): 2 processes x 4
CPU devices train and decode as 1 process x 8; fsdp sharding; bad multi-process input.

Multi-process tests start fresh Python processes (JAX import and compilation in each), so
they are few: one training run (killed in both processes, then resumed) and one decoding
run covering two methods.
"""
import io
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import local_cluster
from models import sharding
from training import checkpoints, data, objectives, tokenizers, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def _cluster(*args, processes=2, devices=4):
  """Runs launch.local_cluster in-process (the children are real processes); returns
  (exit status, output lines)."""
  out = io.StringIO()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    status = local_cluster.run(args[0], list(args[1:]), processes, devices, timeout_s=240,
                               out=out)
  finally:
    os.chdir(cwd)
  return status, out.getvalue().splitlines()


def _config_flags(config):
  return ['--config=configs/ar_lm.py:size=tiny'] + [
      f'--config.{k}={v}' for k, v in (
          ('data.data_dir', config.data.data_dir), ('data.num_shards', 2),
          ('num_train_steps', STEPS), ('batch_size', 8), ('seq_len', 64),
          ('warmup_steps', 2), ('eval_every_steps', STEPS), ('eval_batches', 1),
          ('checkpoint_every_steps', 10), ('log_every_steps', 1))]


def _losses(lines):
  """{step: loss} printed by process 0 of tests/distributed_worker.py."""
  out = {}
  for line in lines:
    if line.startswith('[0] LOSS '):
      _, _, step, loss = line.split()
      out[int(step)] = float(loss)
  return out


def test_two_processes_train_as_one_resume_after_a_kill_and_restore_in_one(tiny_config,
                                                                            tmp_path):
  assert jax.device_count() == 8
  config = tiny_config
  config.data.num_shards = 2  # the same global batches for 1 and 2 processes
  config.num_train_steps, config.warmup_steps = STEPS, 2
  config.eval_every_steps, config.eval_batches = STEPS, 1
  config.checkpoint_every_steps, config.log_every_steps = 10, 1
  losses = {}
  one = trainer.train(config, str(tmp_path / 'one'), progress=False,
                      step_callback=lambda s, m, b: losses.__setitem__(s, float(m['loss'])))
  workdir = str(tmp_path / 'two')
  worker = ['tests.distributed_worker', '--mode=train', f'--workdir={workdir}',
            *_config_flags(config)]
  status, killed = _cluster(*worker, '--kill_after=13')  # last checkpoint: step 10
  assert status != 0 and sorted(_losses(killed)) == list(range(1, 14)), killed[-20:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  status, resumed = _cluster(*worker)
  assert status == 0, resumed[-30:]
  assert sorted(_losses(resumed)) == list(range(11, STEPS + 1))
  curve = {**_losses(killed), **_losses(resumed)}
  for step in range(11, 14):  # steps run before the kill and again after the restore
    assert _losses(killed)[step] == _losses(resumed)[step]
  np.testing.assert_allclose([curve[s] for s in range(1, STEPS + 1)],
                             [losses[s] for s in range(1, STEPS + 1)], rtol=1e-5, atol=1e-5)
  # Process 0 alone wrote TensorBoard events: one file per run.
  assert len(os.listdir(os.path.join(workdir, 'tb'))) == 2
  # The 2-process checkpoint restores in this 1-process, 8-device program.
  restored = checkpoints.restore_model(workdir)
  assert restored.step == STEPS
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(one.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_two_processes_decode_as_one(trained_tiny):
  from launch import generation
  prompts = [[1, 100, 101, 102], [1, 40, 41], [1, 100, 101, 102, 100, 101], [1, 7]]
  options = generation.DecodeOptions(max_new_tokens=12, batch_size=len(prompts))
  methods = ['autoregressive', 'lookup']
  want = {m: generation.decode_tokens(trained_tiny, prompts, m, options)[0] for m in methods}
  status, lines = _cluster('tests.distributed_worker', '--mode=decode',
                           f'--workdir={trained_tiny.workdir}', f'--methods={",".join(methods)}',
                           f'--prompts={json.dumps(prompts)}')
  assert status == 0, lines[-30:]
  results = [line for line in lines if 'RESULT ' in line]
  assert len(results) == 1 and results[0].startswith('[0] RESULT ')  # process 0 prints
  assert json.loads(results[0][len('[0] RESULT '):]) == want


def test_fsdp_shards_every_parameter_eight_ways_and_trains_as_unsharded(tiny_config):
  tokenizer = tokenizers.ByteTokenizer()
  sources = data.load_sources(tiny_config.data)
  batch = next(iter(data.train_dataset(sources['train'], tokenizer, batch_size=8, seq_len=64,
                                       seed=0)))
  objective = objectives.build(tiny_config, tokenizer.vocab_size)
  results = []
  for devices, shape in ((jax.devices()[:1], ''), (jax.devices(), 'fsdp=8')):
    tiny_config.mesh.shape = shape
    setup = trainer.build(tiny_config, objective, batch, devices)
    state = setup.init_state()
    held = sharding.bytes_per_device(state.params)
    total = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.params)))
    if shape:
      print(f'fsdp=8: {total} parameter bytes, per device {sorted(set(held.values()))}')
      assert len(held) == 8 and max(held.values()) <= total / 8 * 1.05
      opt = sharding.bytes_per_device(state.opt_state)
      assert max(opt.values()) <= sum(x.nbytes for x in jax.tree.leaves(
          jax.device_get(state.opt_state))) / 8 * 1.05
    for _ in range(2):
      state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                        setup.frozen)
    results.append((jax.device_get(state.params), float(metrics['loss'])))
  (single, loss1), (fsdp, loss8) = results
  assert np.isclose(loss1, loss8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(fsdp)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_bad_multi_process_input_is_one_line(tiny_config, tmp_path):
  tiny_config.mesh.shape = 'data=3'
  with pytest.raises(ValueError, match=r"mesh shape 'data=3' .* needs 3 devices; there are 8"):
    trainer.train(tiny_config, str(tmp_path / 'mesh'), progress=False)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the 4 processes'):
    data.data_shards(0, 6, 0, 4)
  # A process whose coordinator never answers: one error line within the timeout.
  start = time.monotonic()
  done = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=configs/ar_lm.py:size=tiny',
       f'--workdir={tmp_path / "x"}',
       f'--coordinator_address=127.0.0.1:{local_cluster.free_port()}',
       '--num_processes=2', '--process_id=1', '--distributed_timeout=3'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=local_cluster.process_env(4))
  assert done.returncode == 1 and time.monotonic() - start < 60
  errors = [line for line in done.stderr.splitlines() if line.strip()]
  assert errors[-1].startswith('Error: process 1 could not join the 2-process run at '
                               '127.0.0.1:'), done.stderr[-2000:]
  assert 'Traceback' not in done.stderr and 'Check failure' not in done.stderr
  # Two processes, a batch of 3: each says so in one line and the cluster fails.
  status, lines = _cluster('launch.train', '--config=configs/ar_lm.py:size=tiny',
                           f'--workdir={tmp_path / "odd"}', '--config.batch_size=3',
                           f'--config.data.data_dir={tiny_config.data.data_dir}')
  assert status != 0
  assert any('Error: batch_size=3 is not divisible by the 2 processes' in l for l in lines), lines
