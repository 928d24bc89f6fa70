"""The EAGLE-3 drafter on a trained target (Li et al. 2025; EAGLE-2 trees at decoding):

  python -m launch.train --config=configs/eagle3.py \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/eagle3_small
  python -m launch.decode --workdir=workdirs/ar_small --method=eagle3 \
      --heads_workdir=workdirs/eagle3_small --prompt='def main('

Arguments after ':': size= the target's size (for the schedule). The model block is
copied from target_workdir at training time; the drafter is one decoder layer of it
plus the fusion of the target's feature_layers blocks and a final norm.
"""
import ml_collections

from configs import common, eagle


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small')
  config = eagle.get_config(f'size={args.size}')   # EAGLE's data, schedule and budget
  config.family = 'eagle3'
  del config['eagle']
  config.eagle3 = ml_collections.ConfigDict(dict(
      # Target blocks fused (0-based, comma-separated); '' = first, middle and last
      # (models/heads.default_feature_layers).
      feature_layers='',
      # Training-time test: steps the drafter is unrolled on its own outputs (the paper's
      # code: 7); the depth of the default EAGLE-2 tree (dynamic:4,5,24), since deeper
      # steps are never drafted with it.
      ttt_steps=5,
      step_decay=0.8,          # weight of step j's loss: decay ** j (the paper's code)
  ))
  return config
