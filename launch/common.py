"""Helpers shared by the entry points."""
import contextlib
import importlib.util
import logging
import os
import sys
import threading

import ml_collections
from absl import flags


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' -> get_config(arg), as ml_collections' config flag does."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'Config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location('_launch_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_flags(argv: list[str], flag: str = 'config') -> None:
  """Exits with one clear line when --config names a missing file, a bad argument, or
  an override of a key that does not exist (instead of ml_collections' traceback)."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if spec is None:
    return
  try:
    config = load_config_file(spec)
  except ValueError as e:
    sys.exit(f'Error in --{flag}={spec}: {e}')
  for arg in argv:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(f'--{flag}.'):].split('=', 1)[0]
    node, walked = config, []
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = ', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ''
        where = '.'.join(walked) or 'the top level'
        sys.exit(f'Unknown config key {key!r} in {arg!r}: {where} has no {part!r}. '
                 f'Known keys there: {known}')
      node, walked = node[part], walked + [part]


def setup_logging() -> None:
  """Our INFO lines on stderr; orbax, grain and TFDS (absl loggers) only from WARNING."""
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('jax').setLevel(logging.WARNING)  # backend probing at start-up


@contextlib.contextmanager
def user_errors_as_messages():
  """Errors our code raises for bad input (they name the problem) end the program with
  their message, not a traceback. The traceback still goes to the debug log."""
  try:
    yield
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.debug('Traceback of the error below', exc_info=True)
    sys.exit(f'Error: {e}')


# Multi-process runs (jax.distributed). Every entry point that runs on a pod calls
# define_distributed_flags() at import and init_distributed() first thing in main.
_DISTRIBUTED_ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
                    'num_processes': 'JAX_NUM_PROCESSES', 'process_id': 'JAX_PROCESS_ID'}


def define_distributed_flags() -> None:
  """--coordinator_address, --num_processes, --process_id, --distributed and
  --distributed_timeout (defined once per program, whichever entry point asks first)."""
  if 'coordinator_address' in flags.FLAGS:
    return
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0\'s coordinator '
                      '(multi-process runs); env JAX_COORDINATOR_ADDRESS.')
  flags.DEFINE_integer('num_processes', None, 'Processes in the run; env JAX_NUM_PROCESSES.')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1; env '
                       'JAX_PROCESS_ID.')
  flags.DEFINE_bool('distributed', False, 'Join a multi-process run whose settings the '
                    'cluster provides (TPU pod slice, SLURM, Open MPI, Kubernetes): '
                    'jax.distributed.initialize() auto-detects them.')
  flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every process to '
                       'reach the coordinator before giving up with an error.')


def distributed_settings(values: dict, environ=os.environ) -> dict | None:
  """The jax.distributed.initialize arguments from flag values (None = unset) and the
  environment, or None for a single-process run. Flags win over the environment.
  Raises ValueError for an inconsistent set (an id outside the process count, a count
  without an address, ...)."""
  settings = {}
  for key, env in _DISTRIBUTED_ENV.items():
    value = values.get(key)
    if value is None and environ.get(env):
      value = environ[env]
    settings[key] = value
  for key in ('num_processes', 'process_id'):
    if settings[key] is not None:
      try:
        settings[key] = int(settings[key])
      except ValueError:
        raise ValueError(f'{key}={settings[key]!r} is not an integer.') from None
  address, count, index = (settings[k] for k in _DISTRIBUTED_ENV)
  if not values.get('distributed') and address is None and count is None and index is None:
    return None
  if count is not None and count < 1:
    raise ValueError(f'num_processes={count} must be >= 1.')
  if index is not None and (index < 0 or (count is not None and index >= count)):
    raise ValueError(f'process_id={index} must lie in [0, num_processes={count}).')
  if not values.get('distributed') and (address is None or count is None or index is None):
    missing = [k for k in _DISTRIBUTED_ENV if settings[k] is None]
    raise ValueError(f'A multi-process run needs --coordinator_address, --num_processes and '
                     f'--process_id (or --distributed on a cluster JAX detects); missing '
                     f'{", ".join("--" + m for m in missing)}.')
  if address is not None and ':' not in address:
    raise ValueError(f'coordinator_address={address!r} must be host:port.')
  return settings


def init_distributed(timeout_s: float | None = None) -> None:
  """Joins the multi-process run the flags or environment describe (nothing for a single
  process): jax.distributed.initialize, before anything touches a JAX backend. On CPU
  the cross-process collectives go through gloo. If the coordinator (or any process)
  does not answer within --distributed_timeout seconds the program ends with one error
  line and exit status 1 (JAX itself would abort with a stack trace, later). Raises
  ValueError for inconsistent settings. After it, processes other than 0 log warnings
  only (process 0 writes the logs, TensorBoard events and results)."""
  import jax
  values = {name: flags.FLAGS[name].value for name in
            ('coordinator_address', 'num_processes', 'process_id', 'distributed')}
  settings = distributed_settings(values)
  if settings is None:
    return
  timeout_s = flags.FLAGS.distributed_timeout if timeout_s is None else timeout_s
  if timeout_s <= 0:
    raise ValueError(f'distributed_timeout={timeout_s} must be > 0 seconds.')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = settings['coordinator_address'] or 'the cluster\'s coordinator'

  def give_up():
    print(f'Error: process {settings["process_id"]} could not join the {settings["num_processes"]}'
          f'-process run at {where} within {timeout_s:g}s (coordinator unreachable or a '
          'process missing).', file=sys.stderr, flush=True)
    os._exit(1)

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own deadline is later than ours, so our one-line error is what users see.
    jax.distributed.initialize(settings['coordinator_address'], settings['num_processes'],
                               settings['process_id'],
                               initialization_timeout=int(timeout_s) + 60)
  except (RuntimeError, ValueError) as e:
    raise ValueError(f'jax.distributed.initialize failed: {str(e).splitlines()[0]}') from None
  finally:
    watchdog.cancel()
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  logging.info('Process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """True in process 0 (or a single-process run): the one that prints and writes."""
  import jax
  return jax.process_index() == 0
