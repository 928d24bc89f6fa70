"""Consistency training (CLLM; Kou et al. 2024) of a trained target on its own Jacobi
trajectories: it stays a plain LM and reaches the Jacobi fixed point in fewer iterations.

  # 1. Jacobi trajectories of the target (prompts from the corpus's train split):
  python -m launch.collect_jacobi --workdir=workdirs/ar_tiny --out=workdirs/ar_tiny_jacobi \
      --num_prompts=256 --block_size=16 --num_blocks=4
  # 2. Fine-tune it (consistency loss + AR loss) in a new workdir:
  python -m launch.train --config=configs/cllm.py:size=tiny --workdir=workdirs/cllm_tiny \
      --config.init_from=workdirs/ar_tiny --config.cllm.trajectories=workdirs/ar_tiny_jacobi

The model and tokenizer come from init_from (the target). Eval is the LM loss on the
validation split, comparable with the target's. Arguments after ':': size=tiny|small|base
(the schedule; the model is the target's).
"""
import ml_collections

from configs import ar_lm, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, size='small')
  config = ar_lm.get_config(f'size={args.size}')   # the target's data and eval settings
  config.family = 'cllm'
  config.init_from = ''           # the trained target (required)
  config.cllm = ml_collections.ConfigDict(dict(
      trajectories='',            # dataset dir of launch.collect_jacobi (required)
      ar_weight=10.0,             # w in L_GC + w * L_AR (the authors' training code)
      label_smoothing=0.1,        # of the AR loss (the authors' training code)
  ))
  # A short fine-tune at a peak rate well below pre-training's, no weight decay (the
  # authors' code: 2e-5 on 7B models, weight decay 0, warmup 3%, cosine). The rate sets
  # the trade-off between fewer Jacobi iterations and the LM loss on real text; on the
  # tiny target (README, consistency training) 1e-4 for 400 steps halves the iterations
  # per token for +0.3 nats/byte of validation loss, higher rates buy more speed-up with
  # more loss.
  config.num_train_steps = 400
  config.learning_rate = 1e-4
  config.warmup_steps = 12
  config.weight_decay = 0.0
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
