"""Text corpora as TFDS array_record data sources, and the grain input pipeline.

Sources (the `data.source` config field):
  stdlib        the Python standard library sources on this machine (the default;
                needs no network). `data.include_tests` keeps the stdlib's test folders.
  files:GLOB    local text files, one document per file.
  tfds:NAME     any TFDS dataset with a text feature (`data.text_key`); prepared with
                TFDS's own download, so it needs network access the first time.

Local corpora are built by the TFDS builder `TextFiles` into array_record files
under `data.data_dir`, with a deterministic train/validation split by a hash of
each file's path, and read back with `as_data_source` (random access, no TF).

The pipeline (grain): global shuffle of documents per epoch -> tokenize as
[bos] doc [eos] -> concat-then-split packing into rows of seq_len + 1 tokens ->
window shuffle of rows -> batch. Its iterator state is checkpointed with the
train state, so a resumed run sees exactly the batches it would have seen.
"""
import glob
import hashlib
import os
import sysconfig

import grain
import numpy as np
import tensorflow_datasets as tfds

from training import tokenizers

_TEST_DIRS = {'test', 'tests', 'idle_test'}
_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


class TextFilesConfig(tfds.core.BuilderConfig):
  """Which files form the corpus. The name carries a fingerprint of the file list,
  so a changed corpus is prepared again instead of silently reusing stale data."""

  def __init__(self, *, files: list[str], root: str, validation_permille: int, name: str):
    fingerprint = hashlib.sha1()
    for path in files:
      fingerprint.update(f'{os.path.relpath(path, root)}:{os.path.getsize(path)}\n'.encode())
    fingerprint.update(f'val={validation_permille}'.encode())
    super().__init__(name=f'{name}_{fingerprint.hexdigest()[:10]}', version='1.0.0',
                     description=f'{len(files)} text files under {root}')
    self.files, self.root, self.validation_permille = files, root, validation_permille


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """One example per text file: {'text', 'path'}; split by a hash of the relative path."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'path': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {'train': self._generate_examples('train'),
            'validation': self._generate_examples('validation')}

  def _generate_examples(self, split: str):
    for path in self.builder_config.files:
      relpath = os.path.relpath(path, self.builder_config.root)
      if split_of(relpath, self.builder_config.validation_permille) != split:
        continue
      with open(path, encoding='utf-8', errors='replace') as f:
        yield relpath, {'text': f.read(), 'path': relpath}


def split_of(relpath: str, validation_permille: int) -> str:
  """Deterministic split of a file by the MD5 of its relative path."""
  bucket = int(hashlib.md5(relpath.encode()).hexdigest(), 16) % 1000
  return 'validation' if bucket < validation_permille else 'train'


def stdlib_files(root: str | None = None, include_tests: bool = False) -> list[str]:
  """The .py files of the standard library (installed packages excluded)."""
  root = root or sysconfig.get_paths()['stdlib']
  files = []
  for directory, subdirs, names in os.walk(root):
    parts = set(os.path.relpath(directory, root).split(os.sep))
    subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
    if not include_tests and parts & _TEST_DIRS:
      continue
    files += [os.path.join(directory, n) for n in sorted(names) if n.endswith('.py')]
  return files


class TextSource:
  """A corpus split: random access to documents as str."""

  def __init__(self, data_source, text_key: str):
    self._source, self._key = data_source, text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    value = self._source[index][self._key]
    return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)

  def texts(self):
    for i in range(len(self)):
      yield self[i]


def load_sources(data_config) -> dict[str, TextSource]:
  """{'train': TextSource, 'validation': TextSource} for the configured `data.source`."""
  source = data_config.source
  data_dir = data_config.data_dir or DEFAULT_DATA_DIR
  if source == 'stdlib' or source.startswith('files:'):
    if source == 'stdlib':
      root = data_config.get('stdlib_root') or sysconfig.get_paths()['stdlib']
      if not os.path.isdir(root):
        raise FileNotFoundError(f'Corpus folder {root} does not exist.')
      files = stdlib_files(root, data_config.include_tests)
      name = 'stdlib_with_tests' if data_config.include_tests else 'stdlib'
    else:
      pattern = source[len('files:'):]
      files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      root = os.path.dirname(os.path.commonpath(files)) if len(files) == 1 else (
          os.path.commonpath(files) if files else '')
      name = 'files'
    if not files:
      raise FileNotFoundError(
          f'Corpus folder is empty: data.source={source!r} matched no text files'
          + (f' under {root}' if source == 'stdlib' else '') + '.')
    builder = TextFiles(data_dir=data_dir, file_format='array_record', config=TextFilesConfig(
        files=files, root=root, validation_permille=data_config.validation_permille, name=name))
    builder.download_and_prepare()
    text_key = 'text'
  elif source.startswith('tfds:'):
    name = source[len('tfds:'):]
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'Unknown dataset name {name!r} in data.source={source!r}: TFDS has no '
                       f'such dataset.') from e
    builder.download_and_prepare(file_format='array_record')
    text_key = data_config.text_key
    if text_key not in builder.info.features:
      raise ValueError(f'TFDS dataset {name!r} has no feature {text_key!r} (data.text_key); '
                       f'it has {sorted(builder.info.features)}.')
  else:
    raise ValueError(f'Unknown data.source {source!r}: expected "stdlib", "files:GLOB" or '
                     '"tfds:NAME".')
  splits = {'train': data_config.train_split, 'validation': data_config.validation_split}
  sources = {}
  for role, split in splits.items():
    if split not in builder.info.splits:
      raise ValueError(f'Dataset {builder.name} has no split {split!r} (data.{role}_split); '
                       f'it has {sorted(builder.info.splits)}.')
    sources[role] = TextSource(builder.as_data_source(split=split), text_key)
    if not len(sources[role]):
      raise ValueError(f'The {role} split of data.source={source!r} is empty; add files or '
                       'change data.validation_permille.')
  return sources


class _Tokenize(grain.transforms.Map):
  """str -> {'tokens': [bos] ids [eos]} (int32)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tokenizer = tokenizer

  def map(self, text: str) -> dict:
    ids = self._tokenizer.encode(text)
    t = self._tokenizer
    return {'tokens': np.concatenate([t.bos_prefix, ids, [t.eos_id]]).astype(np.int32)}


class _ToModelBatch(grain.transforms.Map):
  """Packed rows of T + 1 tokens -> next-token inputs and targets.

  Output (all [B, T]): inputs, targets, positions (within each document),
  segment_ids (document ids for the attention mask), loss_mask (target belongs to
  the same document as its input), target_bytes (UTF-8 bytes of each target, for
  bits per byte).
  """

  def __init__(self, token_bytes: np.ndarray):
    self._token_bytes = token_bytes

  def map(self, packed: dict) -> dict:
    tokens, segments = packed['tokens'], packed['tokens_segment_ids']
    targets = tokens[:, 1:]
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
    return {
        'inputs': tokens[:, :-1],
        'targets': targets,
        'positions': packed['tokens_positions'][:, :-1],
        'segment_ids': segments[:, :-1],
        'loss_mask': same_doc,
        'target_bytes': np.where(same_doc, self._token_bytes[targets], 0).astype(np.int32),
    }


def _packed_batches(docs: grain.MapDataset, tokenizer, batch_size: int, seq_len: int,
                    shuffle_seed: int | None, rows_shuffle_window: int):
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs.map(_Tokenize(tokenizer)).to_iter_dataset(),
      length_struct={'tokens': seq_len + 1})
  if shuffle_seed is not None and rows_shuffle_window > 1:
    packed = grain.experimental.WindowShuffleIterDataset(
        packed, window_size=rows_shuffle_window, seed=shuffle_seed)
  batches = packed.batch(batch_size, drop_remainder=True)
  return batches.map(_ToModelBatch(tokenizer.token_bytes()))


def train_dataset(source: TextSource, tokenizer, *, batch_size: int, seq_len: int, seed: int,
                  rows_shuffle_window: int = 64, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Endless, shuffled (reshuffled every epoch) batches of packed documents.

  `batch_size` is the per-process batch. Iterate with `iter(ds)`; the iterator's
  state goes into checkpoints.
  """
  docs = grain.MapDataset.source(source)[process_index::process_count]
  docs = docs.shuffle(seed=seed).repeat(None)
  batches = _packed_batches(docs, tokenizer, batch_size, seq_len, seed, rows_shuffle_window)
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)


def eval_batches(source: TextSource, tokenizer, *, batch_size: int, seq_len: int,
                 num_batches: int, process_index: int = 0, process_count: int = 1):
  """The first `num_batches` batches of the split, in a fixed order (one pass at most)."""
  docs = grain.MapDataset.source(source)[process_index::process_count]
  batches = _packed_batches(docs, tokenizer, batch_size, seq_len, None, 0)
  for i, batch in enumerate(batches):
    if i >= num_batches:
      return
    yield batch


# Data shards: the global batch of a multi-process run.
#
# The global batch is `num_shards` equal blocks of rows, block s coming from its own
# pipeline over documents s, s + num_shards, ... (grain's slice of the source). Process p
# of P builds only the pipelines of its shards (a contiguous range of num_shards / P) and
# hands the mesh its rows of the global batch (trainer.to_device). A given num_shards thus
# gives the same global batches whatever the process count, which is what lets a 2-process
# run reproduce a 1-process one and a checkpoint move between process counts: the data
# state saved is every shard's iterator state (gathered from all processes), and a
# process restoring picks its shards' states. With the default of one shard per process
# this is grain's per-process sharding (ShardByJaxProcess) plus that bookkeeping.


def data_shards(num_shards: int, batch_size: int, process_index: int,
                process_count: int) -> tuple[int, range]:
  """(the number of shards, this process's shards) for a global batch of `batch_size`.

  num_shards: 0 = one per process. Raises ValueError when the process count does not
  divide the batch or the shard count, or the shard count does not divide the batch.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by the {process_count} '
                     'processes (each process feeds an equal share of every batch).')
  num_shards = num_shards or process_count
  if num_shards % process_count:
    raise ValueError(f'data.num_shards={num_shards} is not a multiple of the {process_count} '
                     'processes (each reads whole shards).')
  if batch_size % num_shards:
    raise ValueError(f'batch_size={batch_size} is not divisible by data.num_shards='
                     f'{num_shards}.')
  per_process = num_shards // process_count
  return num_shards, range(process_index * per_process, (process_index + 1) * per_process)


def _concat_rows(batches: list):
  if len(batches) == 1:
    return batches[0]
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


class ShardedIterator:
  """Iterates a process's shard pipelines together: each step, their batches
  concatenated along rows (shard order), i.e. this process's rows of the global batch.
  get_state / set_state: {'shards': {str(shard): grain iterator state}} (a checkpoint
  holds every process's shards; see checkpoints.save)."""

  def __init__(self, datasets: dict):
    self._iters = {shard: iter(ds) for shard, ds in datasets.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return _concat_rows([next(it) for it in self._iters.values()])

  def get_state(self) -> dict:
    return {'shards': {str(shard): it.get_state() for shard, it in self._iters.items()}}

  def set_state(self, state: dict) -> None:
    """Raises ValueError when the state lacks one of this process's shards (it was saved
    with another data.num_shards)."""
    if 'shards' not in state:  # A checkpoint from before data shards: one pipeline.
      state = {'shards': {'0': state}}
    shards = state['shards']
    for shard, it in self._iters.items():
      if str(shard) not in shards:
        raise ValueError(f'The checkpoint\'s data state has shards {sorted(shards, key=int)}, '
                         f'not shard {shard}: it was written with another data.num_shards.')
      it.set_state(shards[str(shard)])

  def close(self) -> None:
    for it in self._iters.values():
      if hasattr(it, 'close'):
        it.close()


class ShardedBatches:
  """A process's share of the training batches: `make(shard, num_shards)` builds shard
  `shard`'s grain IterDataset; iter() gives a fresh ShardedIterator."""

  def __init__(self, make, num_shards: int, shards: range):
    self.num_shards = num_shards
    self.datasets = {s: make(s, num_shards) for s in shards}

  def __iter__(self) -> ShardedIterator:
    return ShardedIterator(self.datasets)


def sharded_eval_batches(source: TextSource, tokenizer, *, batch_size: int, seq_len: int,
                         num_batches: int, num_shards: int, shards: range) -> list:
  """This process's rows of the first `num_batches` global validation batches (each
  shard's eval_batches, rows concatenated). batch_size: the global batch."""
  per_shard = [list(eval_batches(source, tokenizer, batch_size=batch_size // num_shards,
                                 seq_len=seq_len, num_batches=num_batches,
                                 process_index=s, process_count=num_shards)) for s in shards]
  return [_concat_rows(list(rows)) for rows in zip(*per_shard)]


# Jacobi trajectories (consistency training, CLLM; training/objectives/consistency.py).
#
# Storage: a directory with one .npy file per field plus trajectories.json (field
# shapes, block size, the target and collection settings). Every record is a set of
# fixed-shape integer arrays, so column files hold them with no serialization step;
# np.load(mmap_mode='r') gives grain random access without reading the whole dataset
# into memory, and numpy needs no extra dependency. array_record (what the text corpus
# uses, through TFDS) would pay an encode/decode per record for nothing here: its
# strength is variable-length records and sharded streaming of corpora far larger than
# a trajectory set (CLLM trains on ~1M tokens of trajectories).

TRAJECTORY_META = 'trajectories.json'
# field -> (rank, dtype): context [R, C], context_lengths [R], states [R, J, n],
# fixed_point [R, n], iterations [R], block_mask [R, n] (1 for the fixed point's
# tokens up to and including its first EOS).
TRAJECTORY_FIELDS = {'context': (2, np.int32), 'context_lengths': (1, np.int32),
                     'states': (3, np.int32), 'fixed_point': (2, np.int32),
                     'iterations': (1, np.int32), 'block_mask': (2, np.int32)}


def save_trajectories(directory: str, arrays: dict, meta: dict) -> None:
  """Writes a trajectory dataset (fields of TRAJECTORY_FIELDS, R records each) and its
  metadata (any JSON-serializable dict; block_size and num_records are added)."""
  import json
  _check_trajectories(arrays, directory)
  os.makedirs(directory, exist_ok=True)
  for name, (_, dtype) in TRAJECTORY_FIELDS.items():
    np.save(os.path.join(directory, f'{name}.npy'), np.asarray(arrays[name], dtype))
  meta = dict(meta, block_size=int(arrays['fixed_point'].shape[1]),
              num_records=int(arrays['context'].shape[0]),
              shapes={k: list(np.shape(arrays[k])) for k in TRAJECTORY_FIELDS})
  with open(os.path.join(directory, TRAJECTORY_META), 'w') as f:
    json.dump(meta, f, indent=2)


def _check_trajectories(arrays: dict, where: str) -> None:
  missing = [k for k in TRAJECTORY_FIELDS if k not in arrays]
  if missing:
    raise ValueError(f'Trajectory dataset {where} lacks {", ".join(missing)}.')
  records = np.shape(arrays['context'])[0]
  for name, (rank, _) in TRAJECTORY_FIELDS.items():
    shape = np.shape(arrays[name])
    if len(shape) != rank or shape[0] != records:
      raise ValueError(f'Trajectory dataset {where}: {name} has shape {shape}; expected '
                       f'{rank} axes with {records} records first.')
  n = np.shape(arrays['fixed_point'])[1]
  if np.shape(arrays['states'])[2] != n or np.shape(arrays['block_mask'])[1] != n:
    raise ValueError(f'Trajectory dataset {where}: states, fixed_point and block_mask '
                     'disagree on the block size.')
  if records == 0:
    raise ValueError(f'Trajectory dataset {where} holds no records.')


class TrajectorySource:
  """Random access to the records of a trajectory dataset (memory-mapped .npy files):
  record i -> {field: array} without the record axis."""

  def __init__(self, directory: str):
    import json
    path = os.path.join(directory, TRAJECTORY_META)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{directory} is not a trajectory dataset (no {TRAJECTORY_META}); '
                              'collect one with python -m launch.collect_jacobi.')
    with open(path) as f:
      self.meta = json.load(f)
    self.arrays = {name: np.load(os.path.join(directory, f'{name}.npy'), mmap_mode='r')
                   for name in TRAJECTORY_FIELDS}
    _check_trajectories(self.arrays, directory)
    lengths = np.asarray(self.arrays['context_lengths'])
    if lengths.min() < 1 or lengths.max() > self.arrays['context'].shape[1]:
      raise ValueError(f'Trajectory dataset {directory}: context_lengths must lie in '
                       f'[1, {self.arrays["context"].shape[1]}].')

  def __len__(self) -> int:
    return int(self.arrays['context'].shape[0])

  def __getitem__(self, index: int) -> dict:
    return {name: np.array(values[index]) for name, values in self.arrays.items()}


def trajectory_dataset(directory: str, *, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Endless batches of trajectory records (each field [B, ...]), shuffled every epoch.

  `batch_size` is the per-process batch. Raises ValueError when the dataset has fewer
  records than one batch.
  """
  source = TrajectorySource(directory)
  if len(source) // process_count < batch_size:
    raise ValueError(f'Trajectory dataset {directory} has {len(source)} records, fewer than '
                     f'one batch of {batch_size} per process; collect more or lower batch_size.')
  records = grain.MapDataset.source(source)[process_index::process_count]
  batches = records.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
  return grain.experimental.ThreadPrefetchIterDataset(batches.to_iter_dataset(),
                                                      prefetch_buffer_size=2)
