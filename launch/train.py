"""Train any model family: python -m launch.train --config=configs/ar_lm.py:size=tiny --workdir=DIR

Overrides: --config.num_train_steps=N (and any other config key). Rerunning the
same command resumes from the workdir's last checkpoint; raising num_train_steps
on a finished workdir continues training.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, tokenizer and TensorBoard files.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from training import trainer
  with common.user_errors_as_messages():
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
  metrics = ', '.join(f'{k} {v:.4f}' for k, v in result.eval_metrics.items())
  print(f'Finished at step {int(result.state.step)} in {_WORKDIR.value}: {metrics}')


if __name__ == '__main__':
  common.check_config_flags(sys.argv)
  app.run(main)
