"""Draft models through the one trainer: shared tokenizer, distillation toward the target."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import draft as draft_config
from decoding import driver
from decoding.speculative import SpeculativeConfig
from launch import generation
from training import checkpoints, objectives, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _draft_config(trained_tiny, distill, steps=30):
  config = draft_config.get_config(f'size=tiny,distill={distill}')
  config.target_workdir = trained_tiny.workdir
  config.data.data_dir = trained_tiny.config.data.data_dir
  config.num_train_steps = steps
  config.seq_len = 64
  config.warmup_steps = 3
  config.learning_rate = 1e-2
  config.eval_every_steps = config.checkpoint_every_steps = steps
  config.eval_batches = 2
  return config


@pytest.fixture(scope='module')
def distilled(trained_tiny, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('distilled'))
  result = trainer.train(_draft_config(trained_tiny, True), workdir, progress=False)
  return result, checkpoints.restore_model(workdir)


def test_distillation_lowers_kl_and_shares_the_tokenizer(distilled, trained_tiny):
  result, draft = distilled
  first, last = result.eval_history[0][1], result.eval_history[-1][1]
  assert last['kl_to_target'] < 0.5 * first['kl_to_target'], result.eval_history
  assert draft.tokenizer.fingerprint() == trained_tiny.tokenizer.fingerprint()
  assert draft.model.config.num_layers == 1 < trained_tiny.model.config.num_layers
  # The checkpoint holds only the draft: the frozen target is an argument, not state.
  assert set(draft.params) == {'embedding', 'layers', 'final_norm', 'lm_head'}


def test_a_distilled_draft_is_accepted_more_than_a_random_one(distilled, trained_tiny):
  _, draft = distilled
  tok = trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(t)] for t in ('import ', 'def __init__(self', 'return ')]
  padded, lengths = driver.pad_prompts(prompts)
  config = SpeculativeConfig(24, 40, num_draft=4, eos_ids=(tok.eos_id,))
  taus = []
  for params in (draft.params, jax.tree.map(lambda x: x[::-1] if x.ndim else x, draft.params)):
    out = driver.generate(trained_tiny.model, trained_tiny.params, padded, lengths, config,
                          jax.random.PRNGKey(0), draft.model, params)
    taus.append(driver.mean_accepted(out.stats['accepted_histogram']))
  assert taus[0] > taus[1] and taus[0] > 1.5, taus


def test_plain_draft_training_and_clear_errors(trained_tiny, tmp_path):
  config = _draft_config(trained_tiny, False, steps=4)
  assert config.family == 'ar_lm'
  trainer.train(config, str(tmp_path / 'plain'), progress=False)
  plain = checkpoints.restore_model(str(tmp_path / 'plain'))
  assert plain.tokenizer.fingerprint() == trained_tiny.tokenizer.fingerprint()
  distill = _draft_config(trained_tiny, True)
  distill.target_workdir = ''
  with pytest.raises(ValueError, match='Distillation needs config.target_workdir'):
    objectives.build(distill, 259)


def test_decode_command_line_speculative(distilled, trained_tiny, tmp_path):
  _, draft = distilled
  cmd = [sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
         '--method=speculative', f'--draft_workdir={draft.workdir}', '--num_draft=3',
         '--prompt=def f(', '--prompt=import os', '--max_new_tokens=16', '--json']
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  stats = result['stats']
  assert stats['mean_accepted'] >= 1.0 and stats['draft_calls'] > 0
  assert len(stats['accepted_histogram']) == 4
  plain = generation.decode_texts(trained_tiny, ['def f(', 'import os'],
                                  options=generation.DecodeOptions(max_new_tokens=16))
  assert [o['tokens'] for o in result['outputs']] == [o['tokens'] for o in plain['outputs']]
  for spec, depth in (('3,2', 2), ('dynamic:3,4,10', 4)):
    tree = generation.decode_texts(trained_tiny, ['def f(', 'import os'], 'speculative',
                                   generation.DecodeOptions(max_new_tokens=16, tree=spec), draft)
    assert [o['tokens'] for o in tree['outputs']] == [o['tokens'] for o in plain['outputs']]
    assert len(tree['stats']['accepted_histogram']) == depth + 1
  without_draft = [a for a in cmd if not a.startswith('--draft_workdir')]
  missing = subprocess.run(without_draft, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert missing.returncode != 0 and 'needs --draft_workdir' in missing.stderr


def test_a_draft_with_another_tokenizer_is_refused(trained_tiny):
  from training import tokenizers
  texts = ['def f(x):\n    return x\n'] * 50
  other = dataclasses.replace(trained_tiny, tokenizer=tokenizers.SentencePieceTokenizer.train(
      texts, vocab_size=280))
  with pytest.raises(ValueError, match='another tokenizer'):
    generation.decode_texts(trained_tiny, ['x'], 'speculative', draft=other)
