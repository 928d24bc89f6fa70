"""Multi-token prediction LM (Gloeckle et al. 2024), trained from scratch on the corpus:

  python -m launch.train --config=configs/mtp.py:size=small,heads=4 --workdir=workdirs/mtp_small
  python -m launch.decode --workdir=workdirs/mtp_small --method=mtp --prompt='def main('

Arguments after ':': size=tiny|small|base (the trunk, as in configs/ar_lm.py),
heads=n (head i predicts token t + i), tokenizer=byte|bpe. The model is the
`size` LM (its last block is head 1) plus n - 1 extra head blocks on the shared
trunk; head 1 decodes like any LM, heads 2..n draft for self-speculative decoding
(`--method=mtp`). Gradients use the paper's sequential head backward.
"""
from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', heads=4, tokenizer='')
  if args.heads < 2:
    raise ValueError(f'heads={args.heads}: multi-token prediction needs at least 2 heads.')
  config = ar_lm.get_config(f'size={args.size},tokenizer={args.tokenizer}')
  config.family = 'mtp'
  config.model.mtp_heads = args.heads
  return config
