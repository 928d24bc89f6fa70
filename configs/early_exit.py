"""Early-exit LM (exit heads at chosen layers; CALM / LayerSkip training), from scratch:

  python -m launch.train --config=configs/early_exit.py:size=small,exits=2-3 \
      --workdir=workdirs/early_exit_small
  python -m launch.decode --workdir=workdirs/early_exit_small --method=early_exit \
      --threshold=0.9 --confidence=softmax --prompt='def main('        # CALM (LOSSY)
  python -m launch.decode --workdir=workdirs/early_exit_small --method=self_speculative \
      --exit_layer=2 --prompt='def main('                                # LayerSkip (lossless)

Arguments after ':': size=tiny|small|base (the trunk, as in configs/ar_lm.py), layers=N
(override the size's block count; 0 = the size's), exits=2+4+6 or 2-6 (exit layers E:
block E - 1's output through the shared final norm and unembedding; '' = every other
layer, none below 2), recipe=layerskip|calm (training/objectives/early_exit.py),
exit_norm=true (a small RMSNorm per exit), tokenizer=byte|bpe. The model decodes as a
plain LM at its last layer with every method.
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small', layers=0, exits='', recipe='layerskip',
                          exit_norm=False, tokenizer='')
  config = ar_lm.get_config(f'size={args.size},tokenizer={args.tokenizer}')
  config.family = 'early_exit'
  if args.layers:
    config.model.num_layers = args.layers
  num_layers = config.model.num_layers
  if args.exits:
    exits = []
    for part in args.exits.split('+'):
      first, _, last = part.partition('-')
      exits += range(int(first), int(last or first) + 1)
  else:
    exits = list(range(2, num_layers, 2)) or [1]
  config.model.exit_layers = tuple(exits)
  config.model.exit_norm = args.exit_norm
  config.early_exit = ml_collections.ConfigDict(dict(
      recipe=args.recipe,          # layerskip | calm
      layer_dropout=0.1,           # layerskip: p_max, the last block's drop probability
      curriculum='rotational',     # layerskip: none | rotational | gradual
      rotation=2,                  # layerskip rotational curriculum: R
      e_scale=1.0,                 # layerskip: the early exits' loss scale
      classifier_weight=1.0,       # CALM's exit classifier loss (on stop-gradient states)
  ))
  return config
