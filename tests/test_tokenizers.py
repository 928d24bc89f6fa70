"""Byte and SentencePiece BPE tokenizers: lossless round trips, bytes table, files in the workdir."""
import os

import numpy as np
import pytest

from training import tokenizers

SAMPLES = [
    'def f(x):\n    return x  # comment\n\n\tindented_with_tab = "ünïcødé ✓"\n',
    '    leading spaces and trailing   \n\n\n',
    'class A:\n    """Doc."""\n    pass\n',
]


def _bpe():
  texts = [f'def function_{i}(arg_{i}, other):\n    return arg_{i} + {i} * other\n' * 3
           for i in range(300)] + SAMPLES * 20
  return tokenizers.SentencePieceTokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope='module')
def bpe():
  return _bpe()


def test_byte_round_trip_and_specials():
  tok = tokenizers.ByteTokenizer()
  for text in SAMPLES:
    ids = tok.encode(text)
    assert ids.min() >= 3 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.token_bytes()[ids].sum() == len(text.encode())


def test_bpe_is_lossless_on_code(bpe):
  assert bpe.vocab_size == 400
  assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
  for text in SAMPLES + ['never seen: λx → ∞ 😀\n']:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.token_bytes()[ids].sum() == len(text.encode())
  # Trained pieces compress repeated code well below one token per byte.
  text = 'def function_7(arg_7, other):\n    return arg_7 + 7 * other\n'
  assert len(bpe.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize('make', [tokenizers.ByteTokenizer, _bpe])
def test_save_and_load(tmp_path, make):
  tok = make()
  tok.save(str(tmp_path))
  loaded = tokenizers.load(str(tmp_path))
  assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(loaded.encode(SAMPLES[0]), tok.encode(SAMPLES[0]))


def test_missing_tokenizer_files_are_clear_errors(tmp_path, bpe):
  with pytest.raises(FileNotFoundError, match='Tokenizer file missing'):
    tokenizers.load(str(tmp_path))
  bpe.save(str(tmp_path))
  os.remove(tmp_path / tokenizers.SENTENCEPIECE_FILE)
  with pytest.raises(FileNotFoundError, match='Tokenizer file missing.*tokenizer.model'):
    tokenizers.load(str(tmp_path))


def test_unknown_kind():
  with pytest.raises(ValueError, match='Unknown tokenizer kind'):
    tokenizers.create('wordpiece', 100, [])


def _hf_tokenizer_json(bos_post_processor: bool) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SAMPLES * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<pad>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos_post_processor:
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A $B',
                                                       special_tokens=[('<s>', 1)])
  return tok.to_str()


@pytest.mark.parametrize('bos_post_processor', [False, True])
def test_hf_prompts_start_with_bos_only_where_the_tokenizer_adds_it(tmp_path,
                                                                    bos_post_processor):
  """encode_prompt = the model's tokenizer with special tokens; add_bos and the chat
  template survive save/load; a workdir saved before add_bos derives it from the
  stored post-processor."""
  import json
  tokenizer_json = _hf_tokenizer_json(bos_post_processor)
  before, after = tokenizers.special_tokens_added(tokenizer_json)
  assert (before, after) == (([1] if bos_post_processor else []), [])
  tok = tokenizers.HuggingFaceTokenizer(tokenizer_json, 320, 1, [2, 2, 0], None,
                                        add_bos=bool(before), chat_template='{{ messages }}')
  assert tok.eos_ids == (2, 0)
  ids = tok.encode_prompt('def f(x):')
  assert ids.tolist() == [*before, *tok.encode('def f(x):').tolist()]
  tok.save(str(tmp_path))
  assert (tmp_path / 'chat_template.jinja').read_text() == '{{ messages }}'
  loaded = tokenizers.load(str(tmp_path))
  assert loaded.add_bos == bool(before) and loaded.chat_template == '{{ messages }}'
  np.testing.assert_array_equal(loaded.encode_prompt('def f(x):'), ids)
  spec = json.loads((tmp_path / 'tokenizer.json').read_text())
  del spec['add_bos'], spec['chat_template_file']
  (tmp_path / 'tokenizer.json').write_text(json.dumps(spec))
  np.testing.assert_array_equal(tokenizers.load(str(tmp_path)).encode_prompt('def f(x):'), ids)
  with pytest.raises(ValueError, match='add_bos=True needs a bos_id'):
    tokenizers.HuggingFaceTokenizer(tokenizer_json, 320, None, [2], None, add_bos=True)


def test_own_tokenizers_start_prompts_with_bos():
  tok = tokenizers.ByteTokenizer()
  assert tok.encode_prompt('ab').tolist() == [tok.bos_id, *tok.encode('ab').tolist()]
