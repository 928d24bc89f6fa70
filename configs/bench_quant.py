"""Quantized weights on the real model (issue #18), no training:

  python -m launch.convert --from_gguf=smollm2-135m --workdir=/tmp/bench_smol
  python -m launch.convert --from_gguf=smollm2-135m --workdir=/tmp/bench_smol_q4 --keep_quantized
  python -m launch.convert --quantize=int8 --from_workdir=/tmp/bench_smol \
      --workdir=/tmp/bench_smol_int8
  python -m launch.bench --config=configs/bench_quant.py --workdir=/tmp/bench_quant \
      --config.target_workdir=/tmp/bench_smol_q4       # or /tmp/bench_smol, ..._int8

Plain decoding of the target, speculative decoding with a quantized copy of the model as
the draft (config.workdirs.speculative; lossless w.r.t. the target, whatever the draft),
and prompt lookup (lossless, no draft) on the same target, batch 1 greedy, prefill and
decode split; each record carries weight_bytes (bytes of weights one decode step reads).
Where llama-cpp-python is installed, llama.cpp decodes the shipped Q4_1 file itself
(config.llama_cpp_gguf) in the same run: the same blocks as the --keep_quantized target
(for another target, set --config.llama_cpp_gguf='' to give it an f32 export instead).
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
  config.baselines = ('llama.cpp',)
  config.llama_cpp_gguf = 'smollm2-135m'           # the file the _q4 target was imported from
  config.verify_cost = False
  config.prompts_per_category = 1
  return config
