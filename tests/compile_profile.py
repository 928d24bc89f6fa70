"""Where the suite's time goes: per test, the seconds XLA spent compiling, and how many
programs it compiled (with the program names that cost the most).

A pytest plugin, off by default:

  COMPILE_PROFILE=/tmp/cprof python -m pytest -p tests.compile_profile -n auto tests
  python -m tests.compile_profile /tmp/cprof        # the table, most expensive files first

Each process (every pytest-xdist worker) writes DIR/<worker>.json: {test id: {'wall': s,
'compile_s': s, 'trace_s': s, 'compiles': n, 'programs': {name: [n, s]}}}. The seconds
come from jax.monitoring's events (backend_compile_duration, jaxpr_trace_duration,
jaxpr_to_mlir_module_duration), which JAX records for every compile whatever the caller.
"""
import collections
import json
import os
import sys
import time

_EVENTS = {'/jax/core/compile/backend_compile_duration': 'compile_s',
           '/jax/core/compile/jaxpr_trace_duration': 'trace_s',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'trace_s'}
_records: dict = {}
_current: list = [None]


def _listener(event, duration, **kwargs):
  key = _EVENTS.get(event)
  if key is None or _current[0] is None:
    return
  record = _records[_current[0]]
  record[key] = record.get(key, 0.0) + duration
  if key == 'compile_s':
    record['compiles'] = record.get('compiles', 0) + 1
    program = record.setdefault('programs', {}).setdefault(kwargs.get('fun_name', '?'), [0, 0.0])
    program[0] += 1
    program[1] += duration


def pytest_configure(config):
  import jax
  jax.monitoring.register_event_duration_secs_listener(_listener)


def pytest_runtest_protocol(item, nextitem):
  _current[0] = item.nodeid
  _records[item.nodeid] = {'start': time.perf_counter()}


def pytest_runtest_logfinish(nodeid, location):
  record = _records.get(nodeid)
  if record is not None and 'start' in record:
    record['wall'] = time.perf_counter() - record.pop('start')
  _current[0] = None


def pytest_sessionfinish(session):
  out = os.environ.get('COMPILE_PROFILE')
  if not out or not _records:
    return
  os.makedirs(out, exist_ok=True)
  name = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  with open(os.path.join(out, f'{name}.json'), 'w') as f:
    json.dump(_records, f)


def summarize(directory: str, top: int = 40) -> str:
  """The per-file table of the JSON files in `directory`: wall, compile and trace seconds,
  programs compiled, and the costliest program names. Raises FileNotFoundError when the
  directory holds no profile."""
  records = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.json'):
      with open(os.path.join(directory, name)) as f:
        records.update(json.load(f))
  if not records:
    raise FileNotFoundError(f'No compile profile (*.json) in {directory}.')
  files = collections.defaultdict(lambda: collections.Counter())
  programs = collections.defaultdict(lambda: [0, 0.0])
  for test, record in records.items():
    counter = files[test.split('::')[0]]
    for key in ('wall', 'compile_s', 'trace_s', 'compiles'):
      counter[key] += record.get(key, 0)
    for program, (n, seconds) in record.get('programs', {}).items():
      programs[program][0] += n
      programs[program][1] += seconds
  total = sum(files.values(), collections.Counter())
  lines = [f'{"file":44} {"wall s":>8} {"compile s":>10} {"trace s":>8} {"programs":>9}']
  for name, c in sorted(files.items(), key=lambda kv: -kv[1]['wall'])[:top]:
    lines.append(f'{name:44} {c["wall"]:8.0f} {c["compile_s"]:10.0f} {c["trace_s"]:8.0f} '
                 f'{c["compiles"]:9d}')
  lines.append(f'{"all":44} {total["wall"]:8.0f} {total["compile_s"]:10.0f} '
               f'{total["trace_s"]:8.0f} {total["compiles"]:9d}')
  lines.append('')
  lines.append(f'{"program":44} {"compiles":>8} {"compile s":>10}')
  for program, (n, seconds) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:15]:
    lines.append(f'{program[:44]:44} {n:8d} {seconds:10.1f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m tests.compile_profile DIR (the COMPILE_PROFILE directory)')
  try:
    print(summarize(sys.argv[1]))
  except (FileNotFoundError, NotADirectoryError) as e:
    sys.exit(str(e))
