"""The main job: train a small target and a distilled draft on the embedded corpus, then
benchmark every decoding method against plain autoregressive decoding.

  python -m launch.quickstart --workdir=workdirs/quickstart

About 15 minutes on 2 CPU cores with the defaults; raise --target_steps / --draft_steps
for better models. Rerunning reuses finished checkpoints (and resumes unfinished ones).
Writes WORKDIR/target, WORKDIR/draft and WORKDIR/bench/{bench.json,bench.md,bench.png}.

With --heads it also trains Medusa heads and an EAGLE drafter on the target, and a
multi-token prediction model from scratch, tunes the Medusa and MTP trees on validation
data (launch.tune_tree), and benchmarks those methods too (about 45 minutes more on
2 CPU cores: the MTP model trains as long as the target, with 3 more blocks).
"""
import os
import sys

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/quickstart', 'Where everything goes.')
_SIZE = flags.DEFINE_string('size', 'small', 'Target size (configs/ar_lm.py).')
_TARGET_STEPS = flags.DEFINE_integer('target_steps', 300, 'Target training steps.')
_DRAFT_STEPS = flags.DEFINE_integer('draft_steps', 200, 'Distilled draft training steps.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 96, 'Benchmark: new tokens per prompt.')
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
    table = run(_WORKDIR.value, _SIZE.value, _TARGET_STEPS.value, _DRAFT_STEPS.value,
                _MAX_NEW.value, _HEADS.value, _HEADS_STEPS.value)
  print(table)


if __name__ == '__main__':
  app.run(main)
