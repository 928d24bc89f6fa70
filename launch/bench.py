"""Benchmark decoding methods against autoregressive decoding in one process:

  python -m launch.bench --config=configs/bench.py --workdir=OUT

Writes OUT/bench.json, bench.md, bench.png (and verify_cost.png) and prints bench.md: the
table, the per-category decode speedups, the verify-cost curve and what was skipped.
On a real model and real prompts: --config=configs/bench_real.py.
Across processes (each decoding program spans every process's devices; process 0 writes):
  python -m launch.local_cluster --processes=2 --devices_per_process=4 -- launch.bench ...
or the --coordinator_address / --num_processes / --process_id flags on each host.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Benchmark config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where bench.json, bench.md, bench.png go.')
flags.mark_flags_as_required(['config', 'workdir'])
common.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from launch import benchmarking
  with common.user_errors_as_messages():
    common.init_distributed()
    benchmarking.run(_CONFIG.value, _WORKDIR.value)
  if not common.is_main_process():  # Process 0 wrote the files.
    return
  with open(os.path.join(_WORKDIR.value, 'bench.md')) as f:
    print(f.read())


if __name__ == '__main__':
  common.check_config_flags(sys.argv)
  app.run(main)
