"""A draft model for speculative decoding: a smaller LM sharing its target's tokenizer.

  # Distilled from a trained target (forward KL to its next-token distribution):
  python -m launch.train --config=configs/draft.py:size=small \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/draft_small
  # Plain next-token training on the corpus:
  python -m launch.train --config=configs/draft.py:size=small,distill=false \
      --config.target_workdir=workdirs/ar_small --workdir=workdirs/draft_small_plain

Arguments after ':': size=tiny|small|base (the size of the target it drafts for),
distill=true|false.
"""
from configs import ar_lm, common

# Draft trunks, about 1/8 to 1/16 of their target's compute per token.
DRAFT_SIZES = {
    'tiny': dict(num_layers=1, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=192),
    'small': dict(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                  mlp_dim=384),
    'base': dict(num_layers=2, d_model=256, num_heads=8, num_kv_heads=4, head_dim=32,
                 mlp_dim=704),
}


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', distill=True)
  if args.size not in DRAFT_SIZES:
    raise ValueError(f'Unknown draft size {args.size!r}; expected one of {sorted(DRAFT_SIZES)}.')
  config = ar_lm.get_config(f'size={args.size}')   # the target's schedule and data
  config.family = 'distill' if args.distill else 'ar_lm'
  config.target_workdir = ''   # trained target: its tokenizer is copied; distill reads it
  config.model = common.model_config(args.size, **DRAFT_SIZES[args.size])
  return config
