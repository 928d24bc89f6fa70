"""Tunes the static draft tree of Medusa heads or of an MTP model on the validation split
(Medusa's greedy construction, from measured path acceptance; launch/tree_tuning.py):

  python -m launch.tune_tree --workdir=workdirs/ar_small --heads_workdir=workdirs/medusa_small
  python -m launch.tune_tree --workdir=workdirs/mtp_small            # the MTP model's heads

Writes heads_tree.txt into the heads' workdir (MTP: the model's), which --method=medusa
and --method=mtp then use when --heads_tree is not given.
"""
from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'The target (or MTP model) workdir.')
_HEADS = flags.DEFINE_string('heads_workdir', None, 'Medusa heads; omit for an MTP model.')
_BUDGET = flags.DEFINE_integer('budget', 24, 'Tree nodes besides the root.')
_PROMPTS = flags.DEFINE_integer('num_prompts', 64, 'Validation prompts (64 tokens) whose '
                                '128-token greedy continuations are measured.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  import numpy as np
  from launch import tree_tuning
  from training import checkpoints
  with common.user_errors_as_messages():
    target = checkpoints.restore_model(_WORKDIR.value)
    heads = checkpoints.restore_model(_HEADS.value) if _HEADS.value else None
    if heads is None and target.model.config.mtp_heads < 2:
      raise ValueError(f'{_WORKDIR.value} is not a multi-token prediction model: give '
                       '--heads_workdir=DIR (Medusa heads) to tune their tree.')
    tuned = tree_tuning.tune(target, heads, _BUDGET.value, _PROMPTS.value)
    out = tree_tuning.tuned_tree_path(_HEADS.value or _WORKDIR.value)
    with open(out, 'w') as f:
      f.write(str(tuned.tree) + '\n')
  np.set_printoptions(precision=3, suppress=True)
  print(f'How often head k\'s (rows) rank-r (columns) token is the target\'s greedy one, '
        f'{tuned.positions} positions:\n{tuned.accuracy}')
  print(f'Tree of {tuned.tree.num_nodes - 1} nodes, depth {tuned.tree.depth}, expected tau '
        f'{tuned.expected_tau:.2f}:\n{tuned.tree}\nWritten to {out}')


if __name__ == '__main__':
  app.run(main)
