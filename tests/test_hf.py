"""Hugging Face checkpoints in and out, against the reference implementation
(`transformers` on torch CPU, installed by the `hf` extra)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from launch import conversion, generation  # noqa: E402
from training import hf, tokenizers  # noqa: E402
from tests import hf_reference  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
TEXTS = ['def f(x):\n    return x + 1\n', 'import os\nprint(os.getcwd())\n',
         'class A:\n    pass\n'] * 20


@pytest.fixture(scope='module')
def tokenizer_json():
  """A small byte-level BPE tokenizer.json made with the tokenizers library."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=VOCAB - 10, special_tokens=['<pad>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok.to_str()


# Different head counts, grouped-query and multi-head attention, tied and untied
# embeddings, Qwen2's q/k/v biases, non-default rope theta and norm epsilon.
ARCHITECTURES = {
    'llama-gqa-untied': lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5),
    'mistral-mha-tied': lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=6, head_dim=8, tie_word_embeddings=True),
    'qwen2-gqa-bias': lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
}
MODEL_CLASSES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM'}


def _save_reference(name, directory, tokenizer_json, seed=0, **overrides):
  """A randomly initialised transformers model saved in the HF layout (sharded)."""
  config = ARCHITECTURES[name]()
  for key, value in dict(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.1, **overrides).items():
    setattr(config, key, value)
  torch.manual_seed(seed)
  model_class = getattr(transformers, MODEL_CLASSES[name.split('-')[0]])
  model = model_class(config).eval()
  model.save_pretrained(directory, max_shard_size='60KB')   # several shards + an index
  with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
    f.write(tokenizer_json)
  return model


_our_logits = hf_reference.our_logits
_reference_greedy = hf_reference.reference_greedy


@pytest.mark.parametrize('name', list(ARCHITECTURES))
def test_imported_model_equals_the_reference(name, tokenizer_json, tmp_path):
  reference = _save_reference(name, tmp_path / 'hf', tokenizer_json)
  assert os.path.exists(tmp_path / 'hf' / hf.INDEX_FILE)
  restored = conversion.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ours'))

  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 24))
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_our_logits(restored, ids), expected, atol=1e-4, rtol=0)

  # 64 greedy tokens from the compiled decoder == transformers' generate.
  prompts = [[1, *restored.tokenizer.encode(t)] for t in ('def f(', 'import os\n', 'class')]
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive',
                                     generation.DecodeOptions(max_new_tokens=64))
  assert ours == _reference_greedy(reference, prompts, 64, 2)

  # Export -> transformers loads it and computes the same logits; import again: the
  # same weights, bit for bit.
  conversion.export_hf(str(tmp_path / 'ours'), str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(), expected, atol=1e-4,
                               rtol=0)
  again = conversion.import_hf(str(tmp_path / 'exported'), str(tmp_path / 'again'))
  jax.tree.map(np.testing.assert_array_equal, again.params, restored.params)
  assert again.tokenizer.fingerprint() == restored.tokenizer.fingerprint()


def test_speculative_decoding_of_an_imported_target_with_an_imported_draft(tokenizer_json,
                                                                            tmp_path):
  _save_reference('llama-gqa-untied', tmp_path / 'target_hf', tokenizer_json, seed=1,
                  num_hidden_layers=3)
  _save_reference('llama-gqa-untied', tmp_path / 'draft_hf', tokenizer_json, seed=2,
                  num_hidden_layers=1)
  target = conversion.import_hf(str(tmp_path / 'target_hf'), str(tmp_path / 'target'))
  draft = conversion.import_hf(str(tmp_path / 'draft_hf'), str(tmp_path / 'draft'))
  texts = ['def f(', 'import os\n', 'class A:']
  plain = generation.decode_texts(target, texts, options=generation.DecodeOptions(
      max_new_tokens=32))
  for tree in ('', 'dynamic:3,3,8'):
    spec = generation.decode_texts(target, texts, 'speculative', generation.DecodeOptions(
        max_new_tokens=32, num_draft=3, tree=tree), draft)
    assert [o['tokens'] for o in spec['outputs']] == [o['tokens'] for o in plain['outputs']]


def test_tokenizer_json_backend(tokenizer_json, tmp_path):
  tok = tokenizers.HuggingFaceTokenizer(tokenizer_json, 320, bos_id=1, eos_ids=[2, 5],
                                        pad_id=None, add_bos=True)
  text = 'def f(x):\n    return x  # ünïcode\n'
  assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 320 and tok.eos_ids == (2, 5) and tok.eos_id == 2
  assert tok.pad_id == 2 and tok.bos_prefix == [1]
  assert tok.decode([1, *tok.encode('abc'), 2, 310]) == 'abc'   # specials, unused ids dropped
  assert tok.token_bytes()[0] == 0 and tok.token_bytes()[tok.encode('a')[0]] == 1
  tok.save(str(tmp_path))
  loaded = tokenizers.load(str(tmp_path))
  assert loaded.fingerprint() == tok.fingerprint() and loaded.eos_ids == (2, 5)
  assert loaded.bos_prefix == [1]
  assert tokenizers.HuggingFaceTokenizer(tokenizer_json, 320, None, [2], 0).bos_prefix == []


def test_training_starts_from_an_imported_model(tokenizer_json, tiny_config, tmp_path):
  from training import checkpoints, trainer
  _save_reference('qwen2-gqa-bias', tmp_path / 'hf', tokenizer_json)
  imported = conversion.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'imported'))
  tiny_config.init_from = str(tmp_path / 'imported')
  tiny_config.num_train_steps = 2
  tiny_config.eval_every_steps = 2
  tiny_config.eval_batches = 1
  trainer.train(tiny_config, str(tmp_path / 'tuned'), progress=False)
  tuned = checkpoints.restore_model(str(tmp_path / 'tuned'))
  assert tuned.tokenizer.fingerprint() == imported.tokenizer.fingerprint()
  assert tuned.model.config == imported.model.config
  # Two AdamW steps move each weight by at most ~lr per step: the run started from the
  # imported weights (a fresh init would differ by ~0.1, their scale), and it trained.
  change = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                        tuned.params, imported.params))
  assert 0 < max(change) <= 2.5 * tiny_config.learning_rate * 2
  with pytest.raises(ValueError, match='holds imported weights'):
    trainer.train(tiny_config, str(tmp_path / 'imported'), progress=False)


def test_clear_errors(tokenizer_json, tmp_path):
  source = tmp_path / 'hf'
  _save_reference('llama-gqa-untied', source, tokenizer_json)
  config = json.loads((source / 'config.json').read_text())

  def variant(name, edit_config=None, remove=None):
    target = tmp_path / name
    subprocess.run(['cp', '-r', str(source), str(target)], check=True)
    if edit_config:
      (target / 'config.json').write_text(json.dumps({**config, **edit_config}))
    if remove:
      os.remove(target / remove)
    return str(target)

  with pytest.raises(hf.UnsupportedCheckpointError, match="'GPT2LMHeadModel'"):
    conversion.import_hf(variant('gpt2', {'architectures': ['GPT2LMHeadModel']}), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'Tensor model.layers.0.mlp.gate_proj.weight has shape'):
    conversion.import_hf(variant('shape', {'intermediate_size': 100}), str(tmp_path / 'b'))
  with pytest.raises(FileNotFoundError, match='no tokenizer.json'):
    conversion.import_hf(variant('notok', remove='tokenizer.json'), str(tmp_path / 'c'))
  with pytest.raises(FileNotFoundError, match='model-00002-of-'):
    shard = sorted(f for f in os.listdir(source) if f.startswith('model-00002'))[0]
    conversion.import_hf(variant('noshard', remove=shard), str(tmp_path / 'd'))
  with pytest.raises(hf.UnsupportedCheckpointError, match="rope scaling 'longrope'"):
    conversion.import_hf(variant('rope', {'rope_parameters': {'rope_type': 'longrope',
                                                           'rope_theta': 1e4}}),
                      str(tmp_path / 'e'))
  # The command line: one clear line, no traceback.
  done = subprocess.run([sys.executable, '-m', 'launch.convert', f'--from_hf={tmp_path}/none',
                         f'--workdir={tmp_path}/f'], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode != 0 and 'has no config.json' in done.stderr
  assert 'Traceback' not in done.stderr
