"""Every trained drafter of one target in one run: the draft model (speculative chain),
EAGLE-2 and EAGLE-3 (dynamic trees), the parallel block drafter (DFlash chain, DDTree
best-first tree), and the TiDAR one-model drafter (its own model, so its rows come with
that model's own autoregressive baseline):

  python -m launch.bench --config=configs/bench_drafters.py --workdir=OUT \
      --config.target_workdir=T --config.workdirs.speculative=DRAFT \
      --config.workdirs.eagle=EAGLE --config.workdirs.eagle3=EAGLE3 \
      --config.workdirs.parallel_draft=PDRAFT --config.workdirs.tidar=TIDAR

(the quickstart's workdirs: launch.quickstart --model=small --heads, and
configs/eagle3.py, configs/parallel_drafter.py, configs/tidar.py trained on or beside its
target). Drop a method with --config.methods="(...)". Greedy and T = 1, batch 1 and 8.

`configs/bench_drafters.py:prompts=real` benchmarks drafters of an imported model
(SmolLM2) on the real prompts of configs/bench_real.py instead of validation text: the
drafters that read its features (EAGLE-2, EAGLE-3, the parallel drafter; no draft model
or TiDAR model of its vocabulary is trained here).
"""
from configs import bench, bench_real, common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, prompts='validation')
  if args.prompts not in ('validation', 'real'):
    raise ValueError(f'prompts= must be validation or real, got {args.prompts!r}.')
  if args.prompts == 'real':
    config = bench_real.get_config()
    config.methods = ('autoregressive', 'eagle', 'eagle3', 'parallel_draft')
    config.training_free = False
    config.auto = ()
    config.baselines = ()
    config.batch_sizes = (1, 8)
    config.temperatures = (0.0, 1.0)
    config.workdirs = bench.get_config().workdirs
  else:
    config = bench.get_config()
    config.methods = ('autoregressive', 'speculative', 'eagle', 'eagle3', 'parallel_draft',
                      'tidar')
    config.naive_reference = False
    config.repeats = 2
  # Same node count for the three trees: EAGLE-2's and EAGLE-3's 24 and the best-first 24.
  config.trees = dict(speculative=('',), eagle=('dynamic:4,5,24',),
                      eagle3=('dynamic:4,5,24',), parallel_draft=('', 'best:24,4'))
  config.typical = ()
  config.verify_cost = False
  return config
