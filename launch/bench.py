"""Benchmark decoding methods against autoregressive decoding in one process:

  python -m launch.bench --config=configs/bench.py --workdir=OUT

Writes OUT/bench.json, bench.md and bench.png and prints the table.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Benchmark config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where bench.json, bench.md, bench.png go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from launch import benchmarking
  with common.user_errors_as_messages():
    records = benchmarking.run(_CONFIG.value, _WORKDIR.value)
  print(benchmarking.markdown_table(records))


if __name__ == '__main__':
  common.check_config_flags(sys.argv)
  app.run(main)
