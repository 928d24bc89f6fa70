"""Run any entry point as N processes on this machine, joined by jax.distributed on loopback:

  python -m launch.local_cluster --processes=2 --devices_per_process=4 -- \
      launch.train --config=configs/ar_lm.py:size=tiny --workdir=/tmp/run

Each process is `python -m MODULE ARGS --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` on the CPU with `devices_per_process` simulated devices
(XLA_FLAGS=--xla_force_host_platform_device_count) and gloo collectives (set by
launch/common.py's init_distributed), so a 2 x 4 run has the 8-device global mesh of a
1 x 8 run. Each output line is forwarded with a "[I] " prefix. When a process fails the
others are killed, and the exit status is the first failure's (non-zero); 0 when all
succeed. This is how tests and users exercise the multi-process code paths without a pod.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_PROCESSES = flags.DEFINE_integer('processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 4, 'Simulated CPU devices per process.')
_PORT = flags.DEFINE_integer('port', 0, 'Coordinator port on 127.0.0.1; 0 = a free one.')
_TIMEOUT = flags.DEFINE_integer('timeout', 0, 'Kill every process after this many seconds '
                                '(0 = no limit).')


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices: int, environ=os.environ) -> dict:
  """The environment of one local process: CPU only, `devices` simulated devices (any
  other device count in XLA_FLAGS replaced)."""
  env = dict(environ)
  kept = [f for f in env.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)  # The flags say it; a stale variable must not disagree.
  return env


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line)
    out.flush()
  stream.close()


def run(module: str, args: list[str], processes: int, devices_per_process: int,
        port: int = 0, timeout_s: float = 0, out=None) -> int:
  """Starts `processes` copies of `python -m module args ...`, forwards their output
  (stdout and stderr, each line prefixed "[process id] ") to `out` (default stdout), and
  waits. Returns 0 if all exit 0, else the first failure's exit status (-signal for a
  signal; 124 on timeout), after killing the rest. Raises ValueError for bad counts."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f'processes={processes} and devices_per_process={devices_per_process} '
                     'must be >= 1.')
  if module.endswith('.py'):
    raise ValueError(f'{module!r}: give a module name (launch.train), not a file.')
  out = out or sys.stdout
  port = port or free_port()
  env = process_env(devices_per_process)
  procs, threads = [], []
  for index in range(processes):
    cmd = [sys.executable, '-u', '-m', module, *args, f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={processes}', f'--process_id={index}']
    # Own process group: killing a process kills what it started, too.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    procs.append(proc)
    thread = threading.Thread(target=_forward, args=(proc.stdout, f'[{index}] ', out),
                              daemon=True)
    thread.start()
    threads.append(thread)
  status, deadline = 0, time.monotonic() + timeout_s if timeout_s else None
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0].returncode
        break
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        out.write(f'[local_cluster] timeout after {timeout_s:g}s; killing every process\n')
        break
      time.sleep(0.05)
  finally:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
      os.killpg(p.pid, signal.SIGTERM)
    for p in alive:
      try:
        p.wait(timeout=5)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for thread in threads:
      thread.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  if status != 0:
    which = [i for i, p in enumerate(procs) if p.returncode not in (0, None)]
    out.write(f'[local_cluster] failed (exit status {status}; processes {which} did not '
              'finish cleanly)\n')
    out.flush()
  return status


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Give the entry point after --, e.g. '
                         '-- launch.train --config=... --workdir=...')
  try:
    status = run(argv[1], argv[2:], _PROCESSES.value, _DEVICES.value, _PORT.value,
                 _TIMEOUT.value)
  except ValueError as e:
    sys.exit(f'Error: {e}')
  sys.exit(min(abs(status), 255) if status else 0)


if __name__ == '__main__':
  app.run(main)
