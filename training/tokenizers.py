"""Tokenizers: byte-level (no training), SentencePiece BPE trained on the corpus, and
Hugging Face `tokenizer.json` files of imported checkpoints (training/hf.py).

Our own tokenizers share the special ids pad=0, bos=1, eos=2 and always start a
sequence with bos; an imported one takes its ids from the checkpoint and starts with
bos only where the model's own tokenizer adds it (`add_bos`: SmolLM2's and Qwen2's add
none, Llama's do). Data, objectives and decoding read them from the tokenizer (`pad_id`,
`bos_id`, `eos_id`, `eos_ids`, `bos_prefix`), never assume them; a prompt is encoded
with `encode_prompt` (what the model's own tokenizer gives with its special tokens), a
chat with training/chat.py and `chat_template`. A tokenizer is saved inside the workdir
(`tokenizer.json`, plus `tokenizer.model` for BPE, `hf_tokenizer.json` and
`chat_template.jinja` for an imported one) so a checkpoint always travels with it.
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


def check_text(text: str) -> str:
  """`text`, or a one-line ValueError when it is not valid Unicode: a lone surrogate,
  which is how undecodable bytes of a command line (or a JSON "\\ud800") reach Python,
  and which no tokenizer can encode."""
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ValueError(f'The text is not valid Unicode: {e.object[e.start:e.end]!r} at '
                     f'character {e.start} (undecodable bytes?).') from None
  return text


class Tokenizer(abc.ABC):
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  eos_ids: tuple[int, ...] = (EOS_ID,)   # every id that ends a generation (EOS, end of turn)
  chat_template: str | None = None       # Jinja chat template (training/chat.py), if any

  @property
  def bos_prefix(self) -> list[int]:
    """What starts every sequence: [bos_id] for ours; for an imported tokenizer [bos_id]
    where the model's own tokenizer adds it, else [] (SmolLM2's, Qwen2's)."""
    return [] if self.bos_id is None else [self.bos_id]

  def encode_prompt(self, text: str) -> np.ndarray:
    """text -> int32 ids of a prompt: what the model's own tokenizer gives with its
    special tokens (bos_prefix + encode(text)). Chat prompts: training/chat.py."""
    return np.concatenate([np.asarray(self.bos_prefix, np.int32), self.encode(text)])

  def token_string(self, token_id: int | None) -> str | None:
    """The text of one (special) token, e.g. for a chat template's bos_token; None if none."""
    return None

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
    return np.frombuffer(check_text(text).encode('utf-8'), np.uint8).astype(np.int32) + self.OFFSET

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
    return np.asarray(self._sp.encode(check_text(text)), np.int32)

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
  model. `vocab_size` is the model's (embedding rows), which may exceed the tokenizer's
  own size (ids it never produces).

  bos_id: the model's BOS token (a chat template's `bos_token`), or None.
  eos_ids: every end-of-sequence and end-of-turn id (decoding stops at each); the
    first is `eos_id`, the template's `eos_token`.
  pad_id: None = eos_id.
  add_bos: whether the model's own tokenizer starts a prompt with bos_id (its
    post-processor / `add_bos_token`, decided by the importer: training/hf.py).
  chat_template: the model's Jinja chat template (training/chat.py), or None.
  Text is encoded as transformers encodes it by default: literal special-token strings
  in the text (e.g. "<|im_end|>") become those tokens.
  """
  FILE = 'hf_tokenizer.json'
  CHAT_TEMPLATE_FILE = 'chat_template.jinja'

  def __init__(self, tokenizer_json: str, vocab_size: int, bos_id, eos_ids, pad_id,
               add_bos: bool = False, chat_template: str | None = None):
    import tokenizers
    self._json = tokenizer_json
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._vocab_size = int(vocab_size)
    self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))  # Unique, in order.
    if not self.eos_ids:
      raise ValueError('An imported tokenizer needs at least one EOS id (eos_token_id).')
    self.eos_id = self.eos_ids[0]
    self.bos_id = None if bos_id is None else int(bos_id)
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)
    self.add_bos = bool(add_bos)
    if self.add_bos and self.bos_id is None:
      raise ValueError('add_bos=True needs a bos_id.')
    self.chat_template = chat_template or None

  @property
  def bos_prefix(self) -> list[int]:
    return [self.bos_id] if self.add_bos else []

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(check_text(text), add_special_tokens=False).ids,
                      np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._tok.get_vocab_size()],
                            skip_special_tokens=True)

  def token_string(self, token_id: int | None) -> str | None:
    return None if token_id is None else self._tok.id_to_token(int(token_id))

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
    spec = {'kind': 'hf', 'model_file': self.FILE, 'vocab_size': self.vocab_size,
            'bos_id': self.bos_id, 'eos_ids': list(self.eos_ids), 'pad_id': self.pad_id,
            'add_bos': self.add_bos}
    if self.chat_template is not None:
      with open(os.path.join(directory, self.CHAT_TEMPLATE_FILE), 'w') as f:
        f.write(self.chat_template)
      spec['chat_template_file'] = self.CHAT_TEMPLATE_FILE
    _write_json(directory, spec)

  def save_hf(self, directory: str) -> None:
    """The tokenizer in the Hugging Face layout, as transformers (4 and 5) loads it:
    tokenizer.json (its post-processor adds BOS exactly when add_bos),
    tokenizer_config.json (special tokens, add_bos_token, a generic fast-tokenizer class
    so the model type cannot swap in another pre-tokenizer) and chat_template.jinja."""
    import tokenizers
    text = self._json   # Verbatim unless its post-processor disagrees with add_bos.
    if (special_tokens_added(self._json)[0] == [self.bos_id]) != self.add_bos:
      tok = tokenizers.Tokenizer.from_str(self._json)
      bos = self.token_string(self.bos_id)
      tok.post_processor = (tokenizers.processors.TemplateProcessing(
          single=f'{bos}:0 $A:0', pair=f'{bos}:0 $A:0 {bos}:1 $B:1',
          special_tokens=[(bos, self.bos_id)]) if self.add_bos else
          tokenizers.processors.TemplateProcessing(single='$A:0', pair='$A:0 $B:1'))
      text = tok.to_str()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
      f.write(text)
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': self.add_bos,
              'add_eos_token': False, 'clean_up_tokenization_spaces': False}
    for name, token_id in (('bos_token', self.bos_id), ('eos_token', self.eos_id),
                           ('pad_token', self.pad_id)):
      if self.token_string(token_id) is not None:
        config[name] = self.token_string(token_id)
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    if self.chat_template is not None:
      with open(os.path.join(directory, self.CHAT_TEMPLATE_FILE), 'w') as f:
        f.write(self.chat_template)

  def fingerprint(self) -> str:
    """What the tokenizer does to text, not how its file is written: the model (type,
    vocabulary, merges, unknown / byte-fallback settings), the added tokens (content
    and id), the normalizer and the pre-tokenizer, as canonical JSON. Not the special
    ids (BOS, EOS, pad), the post-processor, the template or key order: a draft
    imported from another file of the same tokenizer, with its own stop ids, matches."""
    spec = json.loads(self._json)
    model = {k: v for k, v in (spec.get('model') or {}).items()
             if k not in ('dropout', 'cache_capacity')}
    if isinstance(model.get('merges'), list):  # "a b" and ["a", "b"] are one merge.
      model['merges'] = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
    added = sorted((t['id'], t['content']) for t in spec.get('added_tokens') or [])
    canonical = json.dumps({'model': model, 'added': added,
                            'normalizer': spec.get('normalizer'),
                            'pre_tokenizer': spec.get('pre_tokenizer')}, sort_keys=True)
    return 'hf:' + hashlib.sha1(canonical.encode()).hexdigest()


def special_tokens_added(tokenizer_json: str) -> tuple[list[int], list[int]]:
  """(ids before, ids after) the text that a tokenizer.json's post-processor adds when
  encoding with special tokens (transformers' default for a prompt), e.g. ([1], [])
  for Llama-2's, ([], []) for SmolLM2's and Qwen2's."""
  import tokenizers
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  plain = tok.encode('a', add_special_tokens=False).ids
  full = tok.encode('a', add_special_tokens=True).ids
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return full[:start], full[start + len(plain):]
  raise ValueError('The tokenizer\'s post-processor changes the text\'s own ids; only '
                   'tokens added before or after the text are supported.')


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
  def read(name: str, what: str, mode: str = 'r'):
    """The file `name` that the spec names, with a clear error if it is missing."""
    file_path = os.path.join(directory, name)
    if not os.path.exists(file_path):
      raise FileNotFoundError(f'Tokenizer file missing: {path} names the {what} {file_path}, '
                              'which does not exist.')
    with open(file_path, mode) as f:
      return f.read()

  if spec['kind'] == 'bpe':
    return SentencePieceTokenizer(read(spec['model_file'], 'SentencePiece model', 'rb'))
  if spec['kind'] == 'hf':
    tokenizer_json = read(spec['model_file'], 'Hugging Face tokenizer')
    add_bos = spec.get('add_bos')
    if add_bos is None:
      # A workdir imported before add_bos was stored: its tokenizer.json keeps the model's
      # post-processor, which says what the model's tokenizer adds (the old rule, bos
      # from config.json whenever it names one, was the bug this replaces).
      add_bos = special_tokens_added(tokenizer_json)[0] == [spec['bos_id']]
    template = None
    if spec.get('chat_template_file'):
      template = read(spec['chat_template_file'], 'chat template')
    return HuggingFaceTokenizer(tokenizer_json, spec['vocab_size'], spec['bos_id'],
                                spec['eos_ids'], spec['pad_id'], add_bos=add_bos,
                                chat_template=template)
  raise ValueError(f'{path}: unknown tokenizer kind {spec["kind"]!r} (expected byte, bpe or hf).')


def create(kind: str, vocab_size: int, training_texts: Iterable[str]) -> Tokenizer:
  """Builds a new tokenizer: `byte`, or `bpe` trained on `training_texts`."""
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    return SentencePieceTokenizer.train(training_texts, vocab_size)
  raise ValueError(f'Unknown tokenizer kind {kind!r}; expected "byte" or "bpe".')
