"""TiDAR (Liu et al. 2025): one model trained with the AR loss and the block diffusion loss,
decoded by drafting a block by diffusion and verifying it autoregressively in one forward.

  python -m launch.train --config=configs/tidar.py:size=small,block=4 --workdir=workdirs/tidar
  python -m launch.decode --workdir=workdirs/tidar --method=tidar --prompt='def main('
  python -m launch.decode --workdir=workdirs/tidar --method=autoregressive ...  # its own AR

Arguments after ':': size=tiny|small|base (the trunk and the schedule of configs/ar_lm.py),
block=N (the diffusion block: the next token's slot plus N - 1 drafts per round; it must
divide seq_len), tokenizer=byte|bpe. --config.init_from is not available (the model's
vocabulary has the mask token); --config.target_workdir=T only shares T's tokenizer.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', block=4, tokenizer='')
  config = ar_lm.get_config(f'size={args.size}' + (f',tokenizer={args.tokenizer}'
                                                   if args.tokenizer else ''))
  config.family = 'tidar'
  config.target_workdir = ''   # optional: a workdir whose tokenizer the model shares
  config.tidar = ml_collections.ConfigDict(dict(
      block_size=args.block,   # tokens per diffusion block (>= 2)
      ar_weight=1.0,           # alpha of L = (alpha L_AR + L_diff) / (1 + alpha), the paper's
  ))
  if args.block < 2:
    raise ValueError(f'block={args.block}: a TiDAR block holds the next token and at least '
                     'one draft (>= 2).')
  if config.seq_len % args.block:
    raise ValueError(f'block={args.block} does not divide seq_len={config.seq_len}.')
  return config
