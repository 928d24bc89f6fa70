"""Collect Jacobi trajectories of a trained target for consistency training (CLLM):

  python -m launch.collect_jacobi --workdir=workdirs/ar_tiny --out=workdirs/ar_tiny_jacobi \
      --num_prompts=256 --prompt_len=32 --block_size=16 --num_blocks=4
  python -m launch.collect_jacobi --workdir=DIR --prompt_file=prompts.txt --out=DATASET
  # Statistics only (no --out): Jacobi iterations per token on held-out prompts.
  python -m launch.collect_jacobi --workdir=DIR --split=validation --num_prompts=64

Each prompt is decoded for --num_blocks blocks of --block_size tokens by greedy Jacobi
iteration (decoding/jacobi.py, from --init guesses), each block starting from the
previous blocks' fixed points; every block is one record: its context, its Jacobi states,
its fixed point and the number of iterations it took. Records whose context already
holds an end-of-sequence id are dropped, and a fixed point's tokens after its first EOS
are masked out (block_mask). The dataset (training/data.py: .npy columns +
trajectories.json) is what configs/cllm.py trains on. Prints the iterations per block
and per token, the number consistency training lowers.
"""
import json
import sys

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained target\'s workdir.')
_OUT = flags.DEFINE_string('out', '', 'Dataset directory to write; "" = statistics only.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'Prompts (launch.decode\'s formats) '
                                   'instead of corpus documents.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'validation'],
                           'Corpus split whose documents\' starts are the prompts.')
_SKIP = flags.DEFINE_integer('skip_prompts', 0, 'Corpus prompts to skip first (so training '
                             'and measuring prompts can be disjoint).')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 64, 'Corpus prompts to use.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Tokens per corpus prompt.')
_BLOCK = flags.DEFINE_integer('block_size', 16, 'Jacobi block (window) size n.')
_BLOCKS = flags.DEFINE_integer('num_blocks', 4, 'Blocks decoded per prompt.')
_MAX_ITERS = flags.DEFINE_integer('max_iterations', 0, 'Jacobi iterations per block at most '
                                  '(0 = block_size + 1: greedy Jacobi always converges).')
_INIT = flags.DEFINE_enum('init', 'context', ['context', 'repeat'],
                          'Initial guess of a block (decoding/jacobi.initial_guess).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Prompts per collector call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial guesses.')
_JSON = flags.DEFINE_bool('json', False, 'Print the statistics as one JSON object.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  with common.user_errors_as_messages():
    from launch import benchmarking, generation, trajectories
    from training import checkpoints, data
    restored = checkpoints.restore_model(_WORKDIR.value)
    if _PROMPT_FILE.value:
      source = _PROMPT_FILE.value
      prompts = generation.encode_prompts(restored.tokenizer,
                                          generation.read_prompt_file(_PROMPT_FILE.value))
    else:
      source = f'{_SPLIT.value} split, {_PROMPT_LEN.value} tokens, skip {_SKIP.value}'
      prompts = benchmarking.validation_prompts(restored, _NUM_PROMPTS.value, _PROMPT_LEN.value,
                                                split=_SPLIT.value, skip=_SKIP.value)
    arrays = trajectories.collect(restored, prompts, block_size=_BLOCK.value,
                                  num_blocks=_BLOCKS.value, max_iterations=_MAX_ITERS.value,
                                  batch_size=_BATCH.value, seed=_SEED.value, init=_INIT.value)
    stats = trajectories.summary(arrays)
    if _OUT.value:
      data.save_trajectories(_OUT.value, arrays, dict(
          target_workdir=_WORKDIR.value, target_step=restored.step, prompts=source,
          num_prompts=len(prompts), num_blocks=_BLOCKS.value, init=_INIT.value,
          seed=_SEED.value, **stats))
  if _JSON.value:
    print(json.dumps(stats))
  else:
    print(f'{stats["records"]} blocks of {stats["block_size"]} tokens: '
          f'{stats["iterations_per_block"]:.2f} Jacobi iterations per block, '
          f'{stats["iterations_per_token"]:.3f} per token '
          f'({stats["calls_per_token"]:.3f} target calls per token)'
          + (f'; written to {_OUT.value}' if _OUT.value else ''))


if __name__ == '__main__':
  common.check_config_flags(sys.argv)
  app.run(main)
