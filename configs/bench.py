"""Decoding benchmark: every method against plain autoregressive decoding, same run.

  python -m launch.bench --config=configs/bench.py --workdir=/tmp/bench \
      --config.target_workdir=workdirs/ar_small

Writes bench.json, bench.md and prints the table. Compilation is excluded from timing
(reported as compile_s); each record is the median of `repeats` timed runs after one
untimed warm-up run (`warmup`). Latency is
split into prefill (time to first token, ms per batch call) and decode tokens/s; peak
host memory per method. The verify-cost curve (one cached call of T tokens relative to
one token) is measured per batch size and cached in the target's workdir
(launch/benchmarking.verify_cost_curve reads it back). Real prompts and a real model:
configs/bench_real.py.
"""
import ml_collections


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.target_workdir = 'workdirs/ar_small'  # trained target (launch.train workdir)
  # autoregressive always runs first; any method of decoding/registry.py (speculative,
  # medusa, eagle, mtp, and those the plugins register)
  config.methods = ('autoregressive', 'speculative')
  config.plugins = ()                           # modules registering more methods
  # Each method's second workdir: the draft, the heads / drafter, or (mtp) the method's
  # own model, which is then benchmarked against its own autoregressive decoding.
  config.workdirs = ml_collections.ConfigDict(dict(
      speculative='workdirs/draft_small', medusa='workdirs/medusa_small',
      eagle='workdirs/eagle_small', eagle3='workdirs/eagle3_small', mtp='workdirs/mtp_small',
      tidar='workdirs/tidar_small', block_diffusion='workdirs/bd3lm_small',
      parallel_draft='workdirs/pdraft_small', assd='workdirs/asarm_small'))
  # The trees each method runs with, one record each ('' = the method's default:
  # speculative a chain of num_draft, medusa / mtp the tree launch.tune_tree saved,
  # eagle, eagle3 dynamic:4,5,24, parallel_draft a chain of its trained block). Children
  # per depth '3,2,1', sparse 'paths:...', EAGLE-2 'dynamic:TOP_K,DEPTH,BUDGET', or a
  # parallel drafter's best-first 'best:BUDGET,TOP_K'.
  config.trees = ml_collections.ConfigDict(dict(
      speculative=('', '3,2,1', 'dynamic:4,5,24'), medusa=('4,2,2', ''),
      eagle=('dynamic:4,5,24',), eagle3=('dynamic:4,5,24',), mtp=('1,1,1', '4,2,2', ''),
      parallel_draft=('', 'best:24,4')))
  config.typical = ('medusa',)                  # also typical acceptance (LOSSY), last tree
  config.auto = ()                              # also with num_draft=auto (launch/autotune.py)
  # block_diffusion (its own model, a BD3-LM: configs/bd3lm.py) is measured against the
  # target's AR (an AR model of the same size) with the generative perplexity of its
  # samples under the target: denoising steps per block (0 = the block size) and sampler.
  config.diffusion_steps = 0
  config.diffusion_sampler = 'ancestral'        # or first_hitting
  # early_exit (CALM, LOSSY; a target trained with configs/early_exit.py): one run per
  # threshold ('' = the calibrated one, launch.calibrate_exit), with this measure
  config.exit_thresholds = ()
  config.exit_confidence = 'softmax'
  config.num_draft = 4                          # speculative chain: K
  config.adaptive_threshold = 0.0               # speculative: 0 = always draft K
  config.naive_reference = True                 # also time a Python loop of jitted steps
  config.batch_sizes = (1, 8)                   # rows per decoding call
  config.temperatures = (0.0, 1.0)              # 0 = greedy
  config.training_free = False                  # also every method needing no second model
  # Prompts: '' = the validation split (num_prompts of prompt_len tokens); else a file
  # (plain text, JSONL or Spec-Bench question.jsonl), reported per category.
  config.prompt_file = ''
  config.chat = True                            # render file prompts with the chat template
  config.prompts_per_category = 0               # 0 = all the file's prompts
  # Other engines on the target's weights, greedy rows (skipped with a reason if absent):
  # 'transformers' (generate, and prompt_lookup_num_tokens) and 'llama.cpp' (f32 GGUF).
  config.baselines = ()
  config.prompt_lookup_tokens = 10              # their prompt lookup: tokens drafted (0 = off)
  # llama.cpp's weights: '' = an f32 GGUF export of the target; else a GGUF file (path or
  # smollm2-135m) that llama.cpp decodes as it is, e.g. the file a --keep_quantized target
  # was imported from (the same 4-bit blocks in both engines).
  config.llama_cpp_gguf = ''
  # llama.cpp's KV cache: 'f16' (its default) or 'f32' (our float32 cache's numerics).
  config.llama_cpp_kv_cache = 'f16'
  config.time_prefill = True                    # prefill ms and decode tok/s split
  config.prefill_chunk = 256                    # prompt tokens per prefill call; 0 = one call
  config.verify_cost = True                     # the verify-cost curve per batch size
  config.cost_tokens = (1, 2, 4, 8, 16, 32, 64)
  config.cost_context = 0                       # filled cache slots; 0 = half the capacity
  config.cost_capacity = 0                      # cache slots; 0 = the benchmark's capacity
  config.num_prompts = 8                        # prompts from the validation split
  config.prompt_len = 64                        # tokens per prompt (bos included)
  config.max_new_tokens = 128                   # new tokens per prompt
  config.repeats = 3                            # timed runs per record (median reported)
  config.warmup = True                          # one untimed run of each program first
  # the target's block weights: auto | stacked | per_block (launch/generation.decoding_params)
  config.weight_layout = 'auto'
  config.seed = 0
  return config
