"""Quantized weights on the real model (issue #18), no training:

  python -m launch.convert --from_gguf=smollm2-135m --workdir=/tmp/bench_smol
  python -m launch.convert --from_gguf=smollm2-135m --workdir=/tmp/bench_smol_q4 --keep_quantized
  python -m launch.convert --quantize=int8 --from_workdir=/tmp/bench_smol \
      --workdir=/tmp/bench_smol_int8
  python -m launch.bench --config=configs/bench_quant.py --workdir=/tmp/bench_quant \
      --config.target_workdir=/tmp/bench_smol_int8     # or /tmp/bench_smol, ..._q4

Plain decoding of the target, speculative decoding with a quantized copy of the model as
the draft (config.workdirs.speculative; lossless w.r.t. the target, whatever the draft),
and prompt lookup (lossless, no draft) on the same target, batch 1 greedy, prefill and
decode split; each record carries weight_bytes (bytes of weights one decode step reads).
"""
from configs import bench_real


def get_config(arg: str | None = None):
  config = bench_real.get_config(arg)
  config.methods = ('autoregressive', 'speculative', 'lookup')
  config.training_free = False
  config.workdirs = {'speculative': '/tmp/bench_smol_q4'}   # a quantized draft
  config.trees = {'speculative': ('',)}                      # the chain of num_draft
  config.num_draft = 4
  config.auto = ()
  config.baselines = ()
  config.verify_cost = False
  config.prompts_per_category = 1
  return config
