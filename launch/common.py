"""Helpers shared by the entry points."""
import contextlib
import importlib.util
import logging
import os
import sys

import ml_collections


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
