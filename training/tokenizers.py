"""Tokenizers: byte-level (no training), SentencePiece BPE trained on the corpus, and
Hugging Face `tokenizer.json` files of imported checkpoints (training/hf.py).

Our own tokenizers share the special ids pad=0, bos=1, eos=2; an imported one takes
its ids from the checkpoint's config. Data, objectives and decoding read them from
the tokenizer (`pad_id`, `bos_id`, `eos_id`, `eos_ids`), never assume them. A tokenizer is saved inside the
workdir (`tokenizer.json`, plus `tokenizer.model` for BPE) so a checkpoint
always travels with it.
"""
import abc
import hashlib
import io
import json
import os
from typing import Iterable

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_FILE = 'tokenizer.json'
SENTENCEPIECE_FILE = 'tokenizer.model'


class Tokenizer(abc.ABC):
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  eos_ids: tuple[int, ...] = (EOS_ID,)   # every id that ends a generation

  @property
  def bos_prefix(self) -> list[int]:
    """[bos_id], or [] for a tokenizer without one (e.g. Qwen2's)."""
    return [] if self.bos_id is None else [self.bos_id]

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int: ...

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """text -> int32 ids, no bos/eos added."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text; special ids are dropped."""

  @abc.abstractmethod
  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: UTF-8 bytes each id stands for (0 for specials), for bits/byte."""

  @abc.abstractmethod
  def save(self, directory: str) -> None: ...

  @abc.abstractmethod
  def fingerprint(self) -> str:
    """Equal for tokenizers that map text to the same ids (a draft and its target)."""


class ByteTokenizer(Tokenizer):
  """Ids 3..258 are the bytes 0..255."""
  OFFSET = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.OFFSET

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + self.OFFSET

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
    return data.decode('utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    out = np.ones(self.vocab_size, np.int32)
    out[:self.OFFSET] = 0
    return out

  def save(self, directory: str) -> None:
    _write_json(directory, {'kind': 'byte'})

  def fingerprint(self) -> str:
    return 'byte'


class SentencePieceTokenizer(Tokenizer):
  """BPE with byte fallback and no normalisation, so decode(encode(text)) == text."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID and int(i) < self.vocab_size])

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      out[i] = 1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode())
    return out

  def save(self, directory: str) -> None:
    with open(os.path.join(directory, SENTENCEPIECE_FILE), 'wb') as f:
      f.write(self._proto)
    _write_json(directory, {'kind': 'bpe', 'vocab_size': self.vocab_size,
                            'model_file': SENTENCEPIECE_FILE})

  def fingerprint(self) -> str:
    return 'bpe:' + hashlib.sha1(self._proto).hexdigest()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, max_chars: int = 20_000_000,
            max_line_chars: int = 2048) -> 'SentencePieceTokenizer':
    """Trains BPE on `texts` (split into lines, up to `max_chars` characters)."""
    import sentencepiece as spm

    def lines():
      budget = max_chars
      for text in texts:
        for line in text.split('\n'):
          if line.strip():
            yield line[:max_line_chars]
            budget -= len(line)
        if budget <= 0:
          return

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type='bpe', byte_fallback=True, normalization_rule_name='identity',
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True,
        user_defined_symbols=['\n'], max_sentence_length=max_line_chars * 4,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3,
        num_threads=os.cpu_count() or 1, minloglevel=2, train_extremely_large_corpus=False)
    return cls(model.getvalue())


class HuggingFaceTokenizer(Tokenizer):
  """A `tokenizer.json` read with the `tokenizers` library, with the special ids of the
  model's config. `vocab_size` is the model's (embedding rows), which may exceed the
  tokenizer's own size (ids it never produces)."""
  FILE = 'hf_tokenizer.json'

  def __init__(self, tokenizer_json: str, vocab_size: int, bos_id, eos_ids, pad_id):
    import tokenizers
    self._json = tokenizer_json
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._vocab_size = int(vocab_size)
    self.eos_ids = tuple(int(i) for i in eos_ids)
    if not self.eos_ids:
      raise ValueError('An imported tokenizer needs at least one EOS id (eos_token_id).')
    self.eos_id = self.eos_ids[0]
    self.bos_id = None if bos_id is None else int(bos_id)
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._tok.get_vocab_size()],
                            skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    for i in range(min(self.vocab_size, self._tok.get_vocab_size())):
      if i not in special:
        out[i] = len(self._tok.decode([i]).encode('utf-8'))
    return out

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, self.FILE), 'w') as f:
      f.write(self._json)
    _write_json(directory, {'kind': 'hf', 'model_file': self.FILE, 'vocab_size': self.vocab_size,
                            'bos_id': self.bos_id, 'eos_ids': list(self.eos_ids),
                            'pad_id': self.pad_id})

  def fingerprint(self) -> str:
    specials = f'{self.bos_id}:{self.eos_ids}'.encode()
    return 'hf:' + hashlib.sha1(self._json.encode() + specials).hexdigest()


def _write_json(directory: str, payload: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, TOKENIZER_FILE), 'w') as f:
    json.dump(payload, f)


def exists(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, TOKENIZER_FILE))


def load(directory: str) -> Tokenizer:
  """Loads the tokenizer saved in `directory`, with a clear error if a file is missing."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Tokenizer file missing: {path} does not exist. A workdir keeps '
                            'its tokenizer next to its checkpoints; was it deleted or moved?')
  with open(path) as f:
    spec = json.load(f)
  if spec['kind'] == 'byte':
    return ByteTokenizer()
  if spec['kind'] == 'bpe':
    model_path = os.path.join(directory, spec['model_file'])
    if not os.path.exists(model_path):
      raise FileNotFoundError(f'Tokenizer file missing: {path} names the SentencePiece model '
                              f'{model_path}, which does not exist.')
    with open(model_path, 'rb') as f:
      return SentencePieceTokenizer(f.read())
  if spec['kind'] == 'hf':
    model_path = os.path.join(directory, spec['model_file'])
    if not os.path.exists(model_path):
      raise FileNotFoundError(f'Tokenizer file missing: {path} names the Hugging Face '
                              f'tokenizer {model_path}, which does not exist.')
    with open(model_path) as f:
      return HuggingFaceTokenizer(f.read(), spec['vocab_size'], spec['bos_id'],
                                  spec['eos_ids'], spec['pad_id'])
  raise ValueError(f'{path}: unknown tokenizer kind {spec["kind"]!r} (expected byte, bpe or hf).')


def create(kind: str, vocab_size: int, training_texts: Iterable[str]) -> Tokenizer:
  """Builds a new tokenizer: `byte`, or `bpe` trained on `training_texts`."""
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    return SentencePieceTokenizer.train(training_texts, vocab_size)
  raise ValueError(f'Unknown tokenizer kind {kind!r}; expected "byte" or "bpe".')
