"""Train any model family: python -m launch.train --config=configs/ar_lm.py:size=tiny --workdir=DIR

Overrides: --config.num_train_steps=N (and any other config key). Rerunning the
same command resumes from the workdir's last checkpoint; raising num_train_steps
on a finished workdir continues training.

Multi-process (each process reads its own data shards; parameters and optimizer state
are sharded over the global mesh, --config.mesh.shape=fsdp=8 shards them fully; process 0
writes the logs and TensorBoard events; every process writes its shards of each checkpoint):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the environment
  variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or --distributed
  on a cluster JAX detects (TPU pod slice, SLURM, Open MPI). On one machine:
  python -m launch.local_cluster --processes=2 --devices_per_process=4 -- launch.train ...
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, tokenizer and TensorBoard files.')
flags.mark_flags_as_required(['config', 'workdir'])
common.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from training import trainer
  with common.user_errors_as_messages():
    common.init_distributed()
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
  if not common.is_main_process():
    return
  metrics = ', '.join(f'{k} {v:.4f}' for k, v in result.eval_metrics.items())
  speed = (f'; {result.tokens_per_s:,.0f} training tokens/s at the last log'
           if result.tokens_per_s else '')
  print(f'Finished at step {int(result.state.step)} in {_WORKDIR.value}: {metrics}{speed}')


if __name__ == '__main__':
  common.check_config_flags(sys.argv)
  app.run(main)
