"""Test set-up: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""
import os

# The 8 simulated devices are 8 threads of one process that meet at every collective (a
# rendezvous). XLA:CPU aborts the whole process when one thread arrives more than ~40 s
# after the others, which an overloaded 2-core CI machine can cause (one CI run aborted in
# an 8-device test, taking its worker down); waiting is the right response there, so
# the tests allow 15 minutes before XLA gives up.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8'
                           + ' --xla_cpu_collective_call_warn_stuck_timeout_seconds=120'
                           + ' --xla_cpu_collective_call_terminate_timeout_seconds=900').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent XLA compilation cache per run, shared by the pytest-xdist workers (the
# controller makes it before any worker starts and removes it at the end; set
# FASTDECODE_TEST_XLA_CACHE to choose and keep the directory). Most of the suite's time is
# compiling (tests/compile_profile.py) and files compile the same programs again: each
# one starts with cleared caches (below), and many share the small models and decoders.
# Only single-device programs are written to it (see _single_device_programs_only), and it
# is set in JAX's config, not the environment, so the command-line tests' subprocesses
# compile for themselves.
_OWN_CACHE = None
if 'FASTDECODE_TEST_XLA_CACHE' not in os.environ:
  import tempfile
  _OWN_CACHE = tempfile.mkdtemp(prefix='fastdecode-tests-xla-')
  os.environ['FASTDECODE_TEST_XLA_CACHE'] = _OWN_CACHE

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def _single_device_programs_only():
  """Turns on the persistent compilation cache for programs of one device.

  A program partitioned over the 8 simulated devices, reloaded from the cache, can
  deadlock at its first collective: with JAX 0.10.2 on CPU the Medusa (2,2) decoder of
  test_bench.py, compiled and run once, then loaded from the cache and run, left 4 of
  the 8 device threads waiting at one all-gather and 4 at another until XLA aborted the
  process (reproduced in and across processes). Probable cause (XLA's
  thunk_proto_serdes.cc): a reloaded program's loop body gets a collective resource of its
  own, so its collectives are no longer ordered against those outside the loop and the
  devices may take them in different orders (README, "Run the tests"). Such programs are
  not written, so they always compile. Without the private hook this relies on, the cache
  stays off.
  """
  try:
    from jax._src import compiler
    write = compiler._cache_write
  except (ImportError, AttributeError):
    return

  def write_single_device(cache_key, compile_time_secs, module_name, backend, executable,
                          host_callbacks):
    if len(executable.local_devices()) == 1:
      write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)

  compiler._cache_write = write_single_device
  jax.config.update('jax_compilation_cache_dir', os.environ['FASTDECODE_TEST_XLA_CACHE'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


_single_device_programs_only()

from configs import ar_lm  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE is not None and not os.environ.get('PYTEST_XDIST_WORKER'):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope='module')
def _release_memory_after_each_file():
  """Frees what a test file leaves behind once it is done: the compiled programs (jit
  caches), the decoding layouts launch.generation keeps for the last model (a real
  model's are ~1 GB) and unreachable arrays. A worker runs many files; without this
  one reached 9 GB of resident memory, and two such workers on CI's 24 GB machine
  risk allocation failures."""
  yield
  import gc
  from launch import generation
  generation.release_layouts()
  jax.clear_caches()
  gc.collect()


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


def _shared(tmp_path_factory, name, build):
  """Builds a trained workdir once for the whole run, even under pytest-xdist.

  `build(workdir)` trains into `workdir` and returns its eval metrics (a dict of floats). Each
  xdist worker is its own process with its own session fixtures, so without this every worker
  would train every model again; here the first worker to ask trains (under a file lock, in the
  directory all workers share) and the others restore its checkpoint. Returns (eval metrics,
  restored model).
  """
  import json
  import filelock
  from training import checkpoints
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent                       # shared by every worker of this run
  workdir, done = root / f'shared_{name}', root / f'shared_{name}.json'
  with filelock.FileLock(str(root / f'shared_{name}.lock')):
    if not done.exists():
      workdir.mkdir(exist_ok=True)
      metrics = build(str(workdir))
      done.write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
  return json.loads(done.read_text()), checkpoints.restore_model(str(workdir))


@pytest.fixture(scope='session')
def trained_tiny(tfds_dir, tmp_path_factory):
  """A tiny byte-level LM trained for a few dozen steps, restored for decoding."""
  def build(workdir):
    from training import trainer
    config = ar_lm.get_config('size=tiny')
    config.data.data_dir = tfds_dir
    config.num_train_steps = 40
    config.seq_len = 64
    config.warmup_steps = 5
    config.learning_rate = 1e-2
    config.eval_every_steps = config.checkpoint_every_steps = 40
    config.eval_batches = 1
    return trainer.train(config, workdir, progress=False).eval_metrics
  return _shared(tmp_path_factory, 'trained_tiny', build)[1]


def _train_briefly(config, tfds_dir, tmp_path_factory, name, steps=150):
  """A few hundred steps (or `steps`) of any family on the embedded corpus, trained once per
  run (`_shared`): (eval metrics, restored)."""
  def build(workdir):
    from training import trainer
    config.data.data_dir = tfds_dir
    config.num_train_steps = steps
    config.seq_len = 64
    config.warmup_steps = 10
    config.learning_rate = 1e-2
    config.eval_every_steps = config.checkpoint_every_steps = steps
    config.eval_batches = 1
    return trainer.train(config, workdir, progress=False).eval_metrics
  return _shared(tmp_path_factory, name, build)


@pytest.fixture(scope='session')
def trained_medusa(trained_tiny, tfds_dir, tmp_path_factory):
  """(eval metrics, restored) Medusa-1 heads, 3 of them, on the trained tiny target."""
  from configs import medusa
  config = medusa.get_config('size=tiny,num_heads=3')
  config.target_workdir = trained_tiny.workdir
  return _train_briefly(config, tfds_dir, tmp_path_factory, 'medusa')


@pytest.fixture(scope='session')
def trained_eagle(trained_tiny, tfds_dir, tmp_path_factory):
  """(eval metrics, restored) EAGLE drafter on the trained tiny target."""
  from configs import eagle
  config = eagle.get_config('size=tiny')
  config.target_workdir = trained_tiny.workdir
  return _train_briefly(config, tfds_dir, tmp_path_factory, 'eagle')


@pytest.fixture(scope='session')
def trained_eagle3(trained_tiny, tfds_dir, tmp_path_factory):
  """(eval metrics, restored) EAGLE-3 drafter on the trained tiny target."""
  from configs import eagle3
  config = eagle3.get_config('size=tiny')
  config.target_workdir = trained_tiny.workdir
  return _train_briefly(config, tfds_dir, tmp_path_factory, 'eagle3', steps=80)


@pytest.fixture(scope='session')
def trained_tidar(tfds_dir, tmp_path_factory):
  """(eval metrics, restored) a tiny TiDAR model (block 4) trained from scratch."""
  from configs import tidar
  return _train_briefly(tidar.get_config('size=tiny,block=4'), tfds_dir, tmp_path_factory,
                        'tidar', steps=100)


@pytest.fixture(scope='session')
def trained_mtp(tfds_dir, tmp_path_factory):
  """(eval metrics, restored) a tiny 3-head MTP model trained from scratch."""
  from configs import mtp
  return _train_briefly(mtp.get_config('size=tiny,heads=3'), tfds_dir, tmp_path_factory, 'mtp')


@pytest.fixture
def quick_verify_cost(monkeypatch):
  """launch.benchmarking.measure_verify_cost timing ~0.02 s once per T instead of 0.3 s three
  times (its defaults): for tests that check the curve's plumbing and the choices made from
  it, never a timing. Compilation and every code path stay the same."""
  import functools
  from launch import benchmarking
  monkeypatch.setattr(benchmarking, 'measure_verify_cost',
                      functools.partial(benchmarking.measure_verify_cost, seconds=0.02,
                                        repeats=1))
