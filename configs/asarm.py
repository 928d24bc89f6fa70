"""Any-subset autoregressive model (AS-ARM; Guo and Ermon 2025) on the embedded corpus.

  python -m launch.train --config=configs/asarm.py:size=tiny --workdir=/tmp/asarm_tiny
  python -m launch.decode --workdir=/tmp/asarm_tiny --method=any_order --prompt='def '
  python -m launch.decode --workdir=/tmp/asarm_tiny --method=assd --num_draft=4 --prompt='def '
  python -m launch.decode --workdir=/tmp/asarm_tiny --method=assd --infill \
      --prompt='def add(a, b):\n    return <mask:6>\n'

Arguments after ':': size=tiny|small|base (the trunk and schedule of configs/ar_lm.py, so
an AS-ARM and an AR model of one size train for the same steps on the same data),
order=sorted|random|l2r (training/objectives/any_subset.draw_ranks), tokenizer=byte|bpe.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', order='sorted', tokenizer='')
  config = ar_lm.get_config(f'size={args.size}' + (f',tokenizer={args.tokenizer}'
                                                   if args.tokenizer else ''))
  config.family = 'asarm'
  config.asarm = ml_collections.ConfigDict(dict(
      order=args.order,   # sorted (the paper's joint objective) | random | l2r
      min_rate=0.0,       # each row's masking rate u ~ U[min_rate, max_rate]
      max_rate=1.0,
  ))
  return config
