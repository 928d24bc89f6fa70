"""A multi-process test worker, started by launch.local_cluster (tests/test_distributed.py):

  train   trainer.train as launch.train runs it, printing each step's loss from process 0;
          --kill_after=N ends every process right after step N (os._exit: no clean-up,
          no final checkpoint), a run killed in all its processes at once.
  decode  generation.decode_tokens (what launch.decode runs) for several methods on the
          same prompts; process 0 prints {method: completions} as one JSON line.
"""
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from launch import common

_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'decode'], 'What to run.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir / the model to decode.')
_KILL_AFTER = flags.DEFINE_integer('kill_after', 0, 'train: exit right after this step.')
_METHODS = flags.DEFINE_list('methods', ['autoregressive', 'lookup'], 'decode: methods.')
_PROMPTS = flags.DEFINE_string('prompts', '[]', 'decode: JSON list of token lists.')
common.define_distributed_flags()


def main(argv):
  del argv
  common.setup_logging()
  common.init_distributed()
  import jax
  if _MODE.value == 'train':
    from training import trainer

    def callback(step, metrics, batch):
      del batch
      loss = float(metrics['loss'])  # replicated: every process can read it
      if jax.process_index() == 0:
        print(f'LOSS {step} {loss!r}', flush=True)
      if step == _KILL_AFTER.value:
        if jax.process_index() != 0:
          time.sleep(1)  # so that process 0's last line is out before the cluster stops
        os._exit(3)

    trainer.train(_CONFIG.value, _WORKDIR.value, step_callback=callback, progress=False)
    return
  from launch import generation
  from training import checkpoints
  restored = checkpoints.restore_model(_WORKDIR.value)
  prompts = json.loads(_PROMPTS.value)
  options = generation.DecodeOptions(max_new_tokens=12, batch_size=len(prompts))
  out = {m: generation.decode_tokens(restored, prompts, m, options)[0] for m in _METHODS.value}
  if jax.process_index() == 0:
    print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  app.run(main)
