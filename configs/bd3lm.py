"""Block diffusion LM (BD3-LM; Arriola et al., ICLR 2025) on the embedded corpus.

  python -m launch.train --config=configs/bd3lm.py:size=tiny,block=8 --workdir=/tmp/bd3_8
  python -m launch.decode --workdir=/tmp/bd3_8 --method=block_diffusion --prompt='def ' \
      [--diffusion_steps=8 --diffusion_sampler=ancestral|first_hitting --top_p=0.9]

Arguments after ':': size=tiny|small|base (the trunk and the schedule of configs/ar_lm.py,
so a BD3-LM and an AR model of one size train for the same steps on the same data),
block=N (the block size; it must divide seq_len), schedule=loglinear|cosine|clipped,
tokenizer=byte|bpe. The clipped schedule's interval is bd3lm.clip='BETA,OMEGA'
(python -m launch.bd3lm_eval --clip_search finds the variance-minimising one on a trained
workdir, which BD3-LM then fine-tunes with).
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', block=8, schedule='loglinear', tokenizer='')
  config = ar_lm.get_config(f'size={args.size}' + (f',tokenizer={args.tokenizer}'
                                                   if args.tokenizer else ''))
  config.family = 'bd3lm'
  config.bd3lm = ml_collections.ConfigDict(dict(
      block_size=args.block,     # tokens per block (1 = autoregressive)
      schedule=args.schedule,    # loglinear | cosine | clipped (models/block_diffusion.py)
      eps=1e-3,                  # loglinear: alpha_1
      clip='0.3,0.8',            # clipped: mask rates [beta, omega] in training
  ))
  if config.seq_len % args.block:
    raise ValueError(f'block={args.block} does not divide seq_len={config.seq_len}.')
  return config
