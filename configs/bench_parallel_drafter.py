"""The trained drafters on one target, in one run: the draft model (speculative chain),
EAGLE-2 (dynamic tree) and the parallel block drafter (DFlash chain, DDTree best-first
tree), each against the same autoregressive decoding:

  python -m launch.bench --config=configs/bench_parallel_drafter.py --workdir=OUT \
      --config.target_workdir=T --config.workdirs.speculative=DRAFT \
      --config.workdirs.eagle=EAGLE --config.workdirs.parallel_draft=PDRAFT

(the quickstart's workdirs: launch.quickstart --model=small --heads, and
configs/parallel_drafter.py trained on its target). Greedy and T = 1, batch 1 and 8.
"""
from configs import bench


def get_config(arg: str | None = None):
  config = bench.get_config(arg)
  config.methods = ('autoregressive', 'speculative', 'eagle', 'parallel_draft')
  config.workdirs.parallel_draft = 'workdirs/pdraft_small'
  # Same node count for the two trees: EAGLE-2's 24 and the best-first tree's 24.
  config.trees = dict(speculative=('',), eagle=('dynamic:4,5,24',),
                      parallel_draft=('', 'best:24,4'))
  config.typical = ()
  config.naive_reference = False
  config.verify_cost = False
  config.repeats = 2
  return config
