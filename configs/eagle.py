"""The EAGLE drafter on a trained target (Li et al. 2024; EAGLE-2 trees at decoding):

  python -m launch.train --config=configs/eagle.py \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/eagle_small
  python -m launch.decode --workdir=workdirs/ar_small --method=eagle \
      --heads_workdir=workdirs/eagle_small --prompt='def main('

Arguments after ':': size= the target's size (for the schedule). The model block is
copied from target_workdir at training time; the drafter is one decoder layer of it.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small')
  config = ar_lm.get_config(f'size={args.size}')   # the target's data and schedule
  config.family = 'eagle'
  config.target_workdir = ''   # required: the trained target whose features it reads
  # The paper's loss weights (regression 1, classification 0.1) and feature noise U(-0.1, 0.1).
  config.eagle = ml_collections.ConfigDict(dict(cls_weight=0.1, feature_noise=0.1))
  config.learning_rate = 3e-3
  if args.size == 'small':
    config.num_train_steps = 300
  return config
