"""Checkpoint-and-decode: the library call, the command line and its JSON, clear errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from launch import generation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_decode(*args):
  return subprocess.run([sys.executable, '-m', 'launch.decode', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_decode_texts_matches_autoregressive_rows_and_batches(trained_tiny):
  texts = ['import os', 'def f(', 'class Foo:', 'x = 1', 'for i in range(']
  # data axis 2 on 8 devices: three calls of 2 rows (the last padded) vs one of 6.
  options = generation.DecodeOptions(max_new_tokens=10, batch_size=2, model_parallelism=4)
  batched = generation.decode_texts(trained_tiny, texts, options=options)
  whole = generation.decode_texts(trained_tiny, texts,
                                  options=generation.DecodeOptions(max_new_tokens=10))
  assert [o['tokens'] for o in batched['outputs']] == [o['tokens'] for o in whole['outputs']]
  tok = trained_tiny.tokenizer
  for out in batched['outputs']:
    assert out['completion'] == tok.decode(out['tokens'])
    assert len(out['tokens']) == 10 or out['tokens'][-1] == tok.eos_id
  stats = batched['stats']
  assert stats['new_tokens'] == sum(len(o['tokens']) for o in batched['outputs'])
  assert stats['target_calls'] >= 3 * 1 and stats['compile_s'] > 0 and stats['tokens_per_s'] > 0


def test_command_line_json(trained_tiny, tmp_path):
  prompt_file = tmp_path / 'prompts.txt'
  prompt_file.write_text('def main(\n"class A:\\n    def"\n')
  done = _run_decode(f'--workdir={trained_tiny.workdir}', '--method=autoregressive',
                     f'--prompt_file={prompt_file}', '--prompt=import ', '--max_new_tokens=8',
                     '--temperature=0.9', '--top_k=20', '--seed=3', '--json')
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)  # Exactly one JSON object on stdout.
  assert result['method'] == 'autoregressive'
  assert [o['prompt'] for o in result['outputs']] == ['import ', 'def main(', 'class A:\n    def']
  assert set(result['stats']) >= {'new_tokens', 'target_calls', 'wall_s', 'tokens_per_s',
                                  'compile_s'}
  assert all(0 < len(o['tokens']) <= 8 for o in result['outputs'])


def test_the_default_context_is_the_models(trained_tiny):
  """--max_context defaults to the model's context length (4096 for models trained here,
  8192 for SmolLM2), not a fixed 1024: a prompt of over 1024 tokens gets all its new
  tokens (the cache is still sized to prompt + new tokens)."""
  prompt = 'x = 1\n' * 400
  assert len(trained_tiny.tokenizer.encode(prompt)) > 1024
  done = _run_decode(f'--workdir={trained_tiny.workdir}', f'--prompt={prompt}',
                     '--max_new_tokens=6', '--json')
  assert done.returncode == 0, done.stderr[-2000:]
  (out,) = json.loads(done.stdout)['outputs']
  assert out['finish_reason'] != 'context' and len(out['tokens']) >= 1
  assert out['finish_reason'] == 'stop' or len(out['tokens']) == 6


@pytest.mark.parametrize('args,message', [
    (['--method=telepathy'], "Unknown decoding method 'telepathy'"),
    (['--top_p=0'], r'top_p must be in (0, 1]'),
    (['--max_context=4'], 'longer than the context (4 tokens: --max_context)'),
    (['--max_context=-1'], '--max_context=-1; expected >= 1, or 0'),
    (['--max_context=5000'], "--max_context=5000 is beyond the model's context length (4096"),
    (['--batch_size=-1'], '--batch_size=-1; expected >= 1, or 0 for all the prompts'),
    (['--prefill_chunk=-1'], '--prefill_chunk=-1; expected >= 1 prompt tokens'),
    (['--dtype=float16'], "--dtype=float16; expected one of float32, bfloat16"),
])
def test_command_line_errors_are_clear(trained_tiny, args, message):
  """One message per kind of check (method, sampling settings, prompt vs context) through
  the command line, which prints it without a traceback; the rest via the library."""
  done = _run_decode(f'--workdir={trained_tiny.workdir}', '--prompt=123456789', *args)
  assert done.returncode != 0
  assert message in done.stderr and 'Traceback' not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize('options,message', [
    (dict(max_new_tokens=0), 'max_new_tokens must be > 0'),
    (dict(temperature=-1), 'temperature must be >= 0'),
    (dict(top_k=-2), 'top_k must be an integer >= 0'),
    (dict(min_p=2), 'min_p must be in [0, 1]'),
    (dict(max_context=10), 'fills the context (10 tokens): it leaves no room'),
    (dict(seed=2**64), '--seed=18446744073709551616; expected a 64-bit integer'),
])
def test_option_errors_are_clear(trained_tiny, options, message):
  with pytest.raises(ValueError) as error:
    generation.decode_texts(trained_tiny, ['123456789'],
                            options=generation.DecodeOptions(**options))
  assert message in str(error.value)


def test_library_errors_are_clear(trained_tiny, tmp_path):
  with pytest.raises(ValueError, match='Prompt 1 is empty'):
    generation.decode_texts(trained_tiny, ['ok', ''])
  from training import checkpoints
  with pytest.raises(FileNotFoundError, match='has no checkpoint'):
    checkpoints.restore_model(str(tmp_path))
  done = _run_decode(f'--workdir={tmp_path}', '--prompt=x')
  assert done.returncode != 0 and 'has no checkpoint' in done.stderr
  assert 'Traceback' not in done.stderr
  # A step directory orbax cannot read (here: empty, as a copy cut short leaves it).
  broken = tmp_path / 'broken'
  shutil.copytree(trained_tiny.workdir, broken, ignore=shutil.ignore_patterns('checkpoints'))
  os.makedirs(broken / 'checkpoints' / '3')
  with pytest.raises(ValueError, match=r'checkpoints/3 cannot be read \(incomplete or corrupt'):
    checkpoints.restore_model(str(broken))
  (broken / 'config.json').write_text('{"model": ')
  with pytest.raises(ValueError, match=r'config.json: not valid JSON \(Expecting value'):
    checkpoints.restore_model(str(broken))


def test_max_new_tokens_past_the_context_decodes_to_the_context(trained_tiny):
  """--max_new_tokens far past the cache (even past int32) decodes what the context
  holds, as max_new_tokens = the context does: no overflow into a 1-token answer."""
  prompts = [[1, 100, 101, 102], [1, 40]]
  want, _ = generation.decode_tokens(trained_tiny, prompts, 'lookup', generation.DecodeOptions(
      max_new_tokens=24, max_context=24, weight_layout='per_block'))
  assert max(map(len, want)) > 1
  for huge in (2**31 - 1, 10**11):
    got, stats = generation.decode_tokens(
        trained_tiny, prompts, 'lookup', generation.DecodeOptions(
            max_new_tokens=huge, max_context=24, weight_layout='per_block'))
    assert got == want and stats['finish_reasons'][0]['reason'] in ('context', 'stop')


def test_heads_methods_name_what_is_missing(trained_tiny):
  prompts = [[1, 5, 6]]
  options = generation.DecodeOptions(max_new_tokens=4)
  with pytest.raises(ValueError, match='needs a multi-token prediction model'):
    generation.decode_tokens(trained_tiny, prompts, 'mtp', options)
  with pytest.raises(ValueError, match='needs an EAGLE drafter workdir'):
    generation.decode_tokens(trained_tiny, prompts, 'eagle', options)
  with pytest.raises(ValueError, match='needs a Medusa heads workdir'):
    generation.decode_tokens(trained_tiny, prompts, 'medusa', options, draft=trained_tiny)


def test_a_float32_checkpoint_decodes_in_bfloat16(trained_tiny):
  """checkpoints.with_dtype (launch.decode --dtype): weights, activations and cache in
  bfloat16 from the float32 checkpoint; the first new token agrees with float32's."""
  import jax
  import jax.numpy as jnp
  from training import checkpoints
  half = checkpoints.with_dtype(trained_tiny, 'bfloat16')
  assert half.model.config.dtype == half.model.config.param_dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
  assert trained_tiny.model.config.dtype == 'float32'  # the original is left alone
  options = generation.DecodeOptions(max_new_tokens=12)
  texts = ['import os', 'def f(']
  ours = generation.decode_texts(half, texts, options=options)['outputs']
  full = generation.decode_texts(trained_tiny, texts, options=options)['outputs']
  assert all(len(o['tokens']) == 12 or o['tokens'][-1] == half.tokenizer.eos_id for o in ours)
  assert [o['tokens'][0] for o in ours] == [f['tokens'][0] for f in full], (ours, full)
  with pytest.raises(ValueError, match='expected one of float32, bfloat16'):
    checkpoints.with_dtype(trained_tiny, 'int8')
