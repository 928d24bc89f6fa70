"""The benchmark on a real model and real prompts, no training:

  python -m launch.convert --from_gguf=smollm2-135m --workdir=/tmp/bench_smol
  python -m launch.bench --config=configs/bench_real.py --workdir=/tmp/bench_real \
      --config.target_workdir=/tmp/bench_smol

AR and every method that needs no second model (config.training_free) on the prompts of
data/prompts/specbench_mini.jsonl (Spec-Bench question.jsonl format, rendered with the
model's chat template), reported per category; in the same run, transformers `generate`
(greedy and prompt_lookup_num_tokens) and llama.cpp (f32 GGUF export, greedy and prompt
lookup) on the same weights where installed. Greedy at batch 1 by default; prefill ms,
decode tokens/s, peak memory, and the verify-cost curve per batch size.
"""
import os

from configs import bench

# The prompts shipped with the repository, wherever the command runs from.
PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                       'prompts', 'specbench_mini.jsonl')


def get_config(arg: str | None = None):
  config = bench.get_config(arg)
  config.target_workdir = '/tmp/bench_smol'     # an imported model (launch.convert)
  config.methods = ('autoregressive',)
  config.training_free = True                   # + lookup, jacobi, lookahead, ... if registered
  # Also with the draft length the cost model picks (launch/autotune.py; 0 = plain AR).
  config.auto = ('lookup',)
  config.workdirs = {}
  config.trees = {}
  config.typical = ()
  config.naive_reference = False
  config.prompt_file = PROMPTS
  config.chat = True
  config.prompts_per_category = 0
  config.baselines = ('transformers', 'llama.cpp')
  config.prompt_lookup_tokens = 10              # transformers' documented example value
  config.batch_sizes = (1,)
  config.temperatures = (0.0,)
  config.max_new_tokens = 64
  config.repeats = 1
  config.cost_context = 256                     # a cache of 512 slots, half full
  config.cost_capacity = 512
  return config
