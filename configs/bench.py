"""Decoding benchmark: every method against plain autoregressive decoding, same run.

  python -m launch.bench --config=configs/bench.py --workdir=/tmp/bench \
      --config.target_workdir=workdirs/ar_small

Writes bench.json, bench.md and prints the table. Compilation is excluded from timing
(reported as compile_s); each record is the median of `repeats` timed runs.
"""
import ml_collections


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.target_workdir = 'workdirs/ar_small'  # trained target (launch.train workdir)
  config.draft_workdir = 'workdirs/draft_small'  # draft for `speculative` (same tokenizer)
  # autoregressive always runs first; also: medusa, eagle, mtp
  config.methods = ('autoregressive', 'speculative')
  config.num_draft = 4                          # speculative chain: K
  # speculative: '' = chain, '3,2,1' a static tree, 'dynamic:TOP_K,DEPTH,BUDGET' EAGLE-2
  config.trees = ('', '3,2,1', 'dynamic:4,5,24')
  config.adaptive_threshold = 0.0               # speculative: 0 = always draft K
  config.heads_workdir = 'workdirs/medusa_small'  # Medusa heads for `medusa`
  # medusa: head d's top-b_d at depth d, or '' = the tree launch.tune_tree saved
  config.medusa_trees = ('4,2,2', '')
  config.medusa_typical = True                  # medusa: also typical acceptance (lossy)
  config.eagle_workdir = 'workdirs/eagle_small'  # EAGLE drafter for `eagle`
  config.eagle_trees = ('4,5,24',)              # eagle: EAGLE-2 trees TOP_K,DEPTH,BUDGET
  # `mtp`: a multi-token prediction model (configs/mtp.py), benchmarked against its own
  # autoregressive decoding: a chain of its heads' top-1 and a tree.
  config.mtp_workdir = 'workdirs/mtp_small'
  config.mtp_trees = ('1,1,1', '4,2,2', '')      # '' = its tuned tree (launch.tune_tree)
  config.naive_reference = True                 # also time a Python loop of jitted steps
  config.batch_sizes = (1, 8)                   # rows per decoding call
  config.temperatures = (0.0, 1.0)              # 0 = greedy
  config.num_prompts = 8                        # prompts from the validation split
  config.prompt_len = 64                        # tokens per prompt (bos included)
  config.max_new_tokens = 128                   # new tokens per prompt
  config.repeats = 3                            # timed runs per record (median reported)
  config.seed = 0
  return config
