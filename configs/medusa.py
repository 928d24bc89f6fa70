"""Medusa heads on a trained target (Cai et al. 2024):

  python -m launch.train --config=configs/medusa.py:num_heads=4 \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/medusa_small
  python -m launch.decode --workdir=workdirs/ar_small --method=medusa \
      --heads_workdir=workdirs/medusa_small --prompt='def main('

Arguments after ':': num_heads=K, joint=false (Medusa-1: frozen target, heads only) |
true (Medusa-2: the target trains too, its LM loss kept), size= the target's size
(for the schedule). The model block is copied from target_workdir at training time.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', num_heads=4, joint=False)
  config = ar_lm.get_config(f'size={args.size}')   # the target's data and schedule
  config.family = 'medusa'
  config.target_workdir = ''   # required: the trained target the heads read
  config.medusa = ml_collections.ConfigDict(dict(num_heads=args.num_heads, joint=args.joint))
  config.learning_rate = 1e-3 if args.joint else 3e-3
  if args.size == 'small':
    config.num_train_steps = 300
  return config
