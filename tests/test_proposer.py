"""The proposer interface: a method added in one file plus one registry entry
(tests/repeat_proposer.py) decodes through the driver, launch.decode and launch.bench
exactly as plain autoregressive decoding does; the registry is what launch reads."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import bench as bench_config
from decoding import driver, registry
from decoding.sampling import SamplingConfig
from launch import benchmarking, generation
from tests import repeat_proposer
from tests.test_speculative import PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint, _g_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_new_proposer_is_exact_under_greedy_and_lossless_under_sampling():
  padded, lengths = driver.pad_prompts(PROMPTS)
  config = repeat_proposer.RepeatConfig(17, 30, eos_ids=(2,), num_draft=3)
  out = driver.generate(*TARGET, jnp.asarray(padded), jnp.asarray(lengths), config,
                        jax.random.PRNGKey(0))
  ar = _ar(*TARGET, PROMPTS, 17, 30)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  assert out.stats['accepted_histogram'].shape == (4,)
  # Sampling: the point-mass rule keeps a deterministic chain distributed as the target.
  rows, steps, prompt = 20_000, 3, [1, 3]
  sampling = SamplingConfig(temperature=1.0)
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  config = repeat_proposer.RepeatConfig(steps, len(prompt) + steps, sampling=sampling,
                                        eos_ids=(), num_draft=2)
  out = driver.generate(*VOCAB6_TARGET, jnp.asarray([prompt] * rows),
                        jnp.full((rows,), len(prompt), jnp.int32), config, jax.random.PRNGKey(3))
  assert _g_test(np.asarray(out.tokens[:, len(prompt):]), exact) > 1e-3


def test_a_new_proposer_runs_through_launch_decode_and_launch_bench(trained_tiny, tmp_path):
  assert 'repeat_last' in registry.METHODS  # registered by importing its one file
  texts = ['import os', 'def f(', '    return ']
  plain = generation.decode_texts(trained_tiny, texts,
                                  options=generation.DecodeOptions(max_new_tokens=12))
  cmd = [sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
         '--plugins=tests.repeat_proposer', '--method=repeat_last', '--num_draft=2',
         '--max_new_tokens=12', '--json'] + [f'--prompt={t}' for t in texts]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert [o['tokens'] for o in result['outputs']] == [o['tokens'] for o in plain['outputs']]
  assert len(result['stats']['accepted_histogram']) == 3 and result['stats']['lossless']

  config = bench_config.get_config()
  config.target_workdir = trained_tiny.workdir
  config.plugins = ('tests.repeat_proposer',)
  config.methods = ('autoregressive', 'repeat_last')
  config.batch_sizes, config.temperatures = (2,), (0.0,)
  config.naive_reference = False
  config.num_prompts, config.prompt_len, config.max_new_tokens, config.repeats = 2, 12, 8, 1
  config.time_prefill = config.verify_cost = False  # not read here (test_bench.py checks both)
  records = benchmarking.run(config, str(tmp_path))
  assert [(r['method'], r['lossless'], r['matches_ar']) for r in records] == [
      ('autoregressive', True, True), ('repeat_last', True, True)]


def test_unknown_plugin_and_method_are_one_line_errors(trained_tiny):
  for args, message in ((['--plugins=no.such.module'], "Plugin module 'no.such.module'"),
                        (['--method=telepathy'], "Unknown decoding method 'telepathy'")):
    done = subprocess.run([sys.executable, '-m', 'launch.decode',
                           f'--workdir={trained_tiny.workdir}', '--prompt=x', *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stderr
    assert 'Traceback' not in done.stderr
