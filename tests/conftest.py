"""Test set-up: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from configs import ar_lm  # noqa: E402


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One TFDS data dir for the session, so the stdlib corpus is prepared once."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def tiny_config(tfds_dir):
  """The tiny AR config shrunk to a few seconds of training."""
  config = ar_lm.get_config('size=tiny')
  config.data.data_dir = tfds_dir
  config.num_train_steps = 8
  config.batch_size = 8
  config.seq_len = 64
  config.warmup_steps = 2
  config.eval_every_steps = 4
  config.eval_batches = 2
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  return config


@pytest.fixture(scope='session')
def trained_tiny(tfds_dir, tmp_path_factory):
  """A tiny byte-level LM trained for a few dozen steps, restored for decoding."""
  from training import checkpoints, trainer
  config = ar_lm.get_config('size=tiny')
  config.data.data_dir = tfds_dir
  config.num_train_steps = 40
  config.seq_len = 64
  config.warmup_steps = 5
  config.learning_rate = 1e-2
  config.eval_every_steps = config.checkpoint_every_steps = 40
  config.eval_batches = 1
  workdir = str(tmp_path_factory.mktemp('trained_tiny'))
  trainer.train(config, workdir, progress=False)
  return checkpoints.restore_model(workdir)
