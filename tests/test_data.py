"""Corpora (stdlib TFDS builder, files:GLOB, tfds:NAME) and the grain pipeline."""
import os
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from training import data, tokenizers


def _data_config(tfds_dir, **overrides):
  config = common.data_config()
  config.data_dir = tfds_dir
  config.update(overrides)
  return config


class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset made by the test, standing in for a registry dataset."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'content': tfds.features.Text(), 'id': tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(range(0, 40)),
            'validation': self._generate_examples(range(40, 45))}

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {'content': f'document {i}: ' + 'abc ' * i, 'id': i}


def _write_files(directory, count):
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    with open(os.path.join(directory, f'file_{i}.txt'), 'w') as f:
      f.write(f'text file number {i}\n' * (i + 1))


def test_stdlib_corpus_split_is_deterministic_and_tests_optional(tfds_dir):
  without = data.stdlib_files()
  with_tests = data.stdlib_files(include_tests=True)
  assert len(with_tests) > len(without) > 100
  assert not any(os.sep + 'test' + os.sep in p for p in without)
  assert not any('site-packages' in p for p in with_tests)
  sources = data.load_sources(_data_config(tfds_dir))
  train, val = sources['train'], sources['validation']
  assert len(train) + len(val) == len(without) and 0 < len(val) < len(train) / 5
  root = sysconfig.get_paths()['stdlib']
  val_paths = {s['path'].decode() for s in (val._source[i] for i in range(len(val)))}
  assert val_paths == {os.path.relpath(p, root) for p in without
                       if data.split_of(os.path.relpath(p, root), 50) == 'validation'}
  assert 'import' in ''.join(val.texts())


def test_local_files_and_empty_corpus(tmp_path, tfds_dir):
  _write_files(tmp_path / 'corpus', 60)
  sources = data.load_sources(_data_config(tfds_dir, source=f'files:{tmp_path}/corpus/*.txt',
                                           validation_permille=200))
  assert len(sources['train']) + len(sources['validation']) == 60
  assert sources['train'][0].startswith('text file number')
  with pytest.raises(FileNotFoundError, match='Corpus folder is empty'):
    data.load_sources(_data_config(tfds_dir, source=f'files:{tmp_path}/nothing/*.txt'))
  os.makedirs(tmp_path / 'empty_stdlib')
  with pytest.raises(FileNotFoundError, match='Corpus folder is empty'):
    data.load_sources(_data_config(tfds_dir, stdlib_root=str(tmp_path / 'empty_stdlib')))


def test_tfds_dataset_by_name(tmp_path):
  config = _data_config(str(tmp_path), source='tfds:tiny_text_corpus', text_key='content')
  sources = data.load_sources(config)
  assert len(sources['train']) == 40 and len(sources['validation']) == 5
  assert all(t.startswith('document 4') for t in sources['validation'].texts())
  with pytest.raises(ValueError, match="no feature 'text'"):
    data.load_sources(_data_config(str(tmp_path), source='tfds:tiny_text_corpus'))


def test_unknown_dataset_names_are_clear_errors(tfds_dir):
  with pytest.raises(ValueError, match="Unknown dataset name 'no_such_dataset_xyz'"):
    data.load_sources(_data_config(tfds_dir, source='tfds:no_such_dataset_xyz'))
  with pytest.raises(ValueError, match="Unknown data.source 'wikipedia'"):
    data.load_sources(_data_config(tfds_dir, source='wikipedia'))


def test_packed_batches_and_exact_iterator_resume(tmp_path, tfds_dir):
  _write_files(tmp_path / 'corpus', 50)
  sources = data.load_sources(_data_config(tfds_dir, source=f'files:{tmp_path}/corpus/*.txt',
                                           validation_permille=200))
  tok = tokenizers.ByteTokenizer()
  ds = data.train_dataset(sources['train'], tok, batch_size=4, seq_len=32, seed=3)
  it = iter(ds)
  batches = [next(it) for _ in range(5)]
  b = batches[0]
  assert {k: v.shape for k, v in b.items()} == {k: (4, 32) for k in b}
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  # Documents start with bos and end with eos; the eos -> next bos target is masked out.
  eos_positions = b['inputs'] == tok.eos_id
  assert not b['loss_mask'][eos_positions].any()
  assert (b['positions'][b['inputs'] == tok.bos_id] == 0).all()
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # Same seed, same order; another seed, another order.
  again = iter(data.train_dataset(sources['train'], tok, batch_size=4, seq_len=32, seed=3))
  np.testing.assert_array_equal(next(again)['inputs'], b['inputs'])
  other = iter(data.train_dataset(sources['train'], tok, batch_size=4, seq_len=32, seed=4))
  assert not np.array_equal(next(other)['inputs'], b['inputs'])
