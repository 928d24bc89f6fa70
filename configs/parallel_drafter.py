"""The parallel block drafter (DFlash, Chen et al. 2026) on a trained target:

  python -m launch.train --config=configs/parallel_drafter.py \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/pdraft_small
  python -m launch.decode --workdir=workdirs/ar_small --method=parallel_draft \
      --draft_workdir=workdirs/pdraft_small [--block_size=8] [--tree=best:16,4] \
      --prompt='def main('

Arguments after ':': size= the target's size (for the schedule). The model block is
copied from target_workdir at training time; the drafter has the target's width.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small')
  config = ar_lm.get_config(f'size={args.size}')   # the target's data and schedule
  config.family = 'parallel_drafter'
  config.target_workdir = ''   # required: the trained target whose features it reads
  config.parallel_drafter = ml_collections.ConfigDict(dict(
      num_layers=2,          # drafter layers (DFlash: 1-5 on 4B-30B targets)
      block_size=8,          # the root + 7 drafted positions per call (DFlash: 10 or 16)
      target_layers=(),      # target blocks fused; () = first, middle and last
      num_anchors=32,        # blocks trained per sequence (DFlash samples anchors per epoch)
      loss_decay=4.0,        # gamma of the exp(-(k - 1) / gamma) position weights
  ))
  config.learning_rate = 3e-3
  if args.size == 'small':
    config.num_train_steps = 300
  return config
