"""Autoregressive LM (Llama-style trunk) on the embedded Python-stdlib corpus.

  python -m launch.train --config=configs/ar_lm.py:size=tiny --workdir=/tmp/ar_tiny
  python -m launch.train --config=configs/ar_lm.py:size=small --workdir=/tmp/ar_small \
      --config.num_train_steps=4000

Arguments after ':': size=tiny|small|base, tokenizer=byte|bpe (default: byte for
tiny, bpe for small and base).
"""
from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', tokenizer='')
  config = common.train_config()
  config.model = common.model_config(args.size)
  config.tokenizer.kind = args.tokenizer or ('byte' if args.size == 'tiny' else 'bpe')
  if args.size == 'tiny':
    config.num_train_steps = 300
    config.batch_size = 8
    config.seq_len = 128
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.warmup_steps = 20
  elif args.size == 'small':
    config.num_train_steps = 400     # about 10 minutes on 2 CPU cores (~1.5 s/step)
    config.warmup_steps = 40
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
  elif args.size == 'base':
    config.num_train_steps = 20_000
    config.batch_size = 64
    config.seq_len = 1024
    config.learning_rate = 1e-3
    config.tokenizer.vocab_size = 8192
  return config
