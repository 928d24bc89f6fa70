"""launch.bench end to end on the tiny model: records, schema, lossless outputs."""
import json
import os

from configs import bench as bench_config
from launch import benchmarking


def test_bench_records_and_tables(trained_tiny, tmp_path):
  config = bench_config.get_config()
  config.target_workdir = trained_tiny.workdir
  config.workdirs.speculative = trained_tiny.workdir  # the target as its own draft: tau = K + 1
  config.num_draft = 3
  config.trees.speculative = ('', '2,1')
  config.batch_sizes = (3,)
  config.temperatures = (0.0, 1.0)
  config.num_prompts = 3
  config.prompt_len = 12
  config.max_new_tokens = 8
  config.repeats = 1
  records = benchmarking.run(config, str(tmp_path))
  with open(tmp_path / 'bench.json') as f:
    assert json.load(f) == records
  assert os.path.exists(tmp_path / 'bench.md') and os.path.getsize(tmp_path / 'bench.png') > 0
  keys = {'method', 'lossless', 'batch_size', 'temperature', 'mean_accepted', 'target_calls',
          'tokens_per_s', 'speedup_vs_ar', 'compile_s', 'backend', 'device', 'matches_ar'}
  assert all(keys <= set(r) for r in records)
  methods = [(r['method'], r['batch_size'], r['temperature']) for r in records]
  spec, tree = 'speculative', 'speculative(2,1)'
  assert methods == [
      ('autoregressive', 3, 0.0), (spec, 3, 0.0), (tree, 3, 0.0), ('naive_python_loop', 3, 0.0),
      ('autoregressive', 3, 1.0), (spec, 3, 1.0), (tree, 3, 1.0)]
  assert all(r['matches_ar'] is True for r in records if r['lossless'] and r['temperature'] == 0)
  assert all(r['ar_agreement'] == 'identical' for r in records  # float32: token for token
             if r['lossless'] and r['temperature'] == 0 and r['method'] != 'naive_python_loop')
  assert all(r['tokens_per_s'] > 0 and r['target_calls'] >= 1 for r in records)
  for r in records:
    if r['method'] == spec:  # A draft equal to the target accepts everything.
      assert r['mean_accepted'] == 4.0 and r['draft_calls'] > 0
    if r['method'] == tree:
      assert r['mean_accepted'] == 3.0


def test_bench_with_heads_and_an_mtp_model(trained_tiny, trained_medusa, trained_eagle,
                                           trained_mtp, tmp_path):
  """medusa (two trees + typical), eagle and mtp rows: the MTP model against its own AR."""
  config = bench_config.get_config()
  config.target_workdir = trained_tiny.workdir
  config.methods = ('autoregressive', 'medusa', 'eagle', 'mtp')
  config.workdirs.medusa = trained_medusa[1].workdir
  config.trees.medusa = ('2,2', '1,1,1')
  config.workdirs.eagle = trained_eagle[1].workdir
  config.trees.eagle = ('dynamic:2,3,6',)
  config.workdirs.mtp = trained_mtp[1].workdir
  config.trees.mtp = ('1,1', '2,2')
  config.batch_sizes = (2,)
  config.temperatures = (0.0,)
  config.naive_reference = False
  config.num_prompts = 2
  config.prompt_len = 12
  config.max_new_tokens = 12
  config.repeats = 1
  records = benchmarking.run(config, str(tmp_path))
  assert [(r['method'], r['lossless']) for r in records] == [
      ('autoregressive', True), ('medusa(2,2)', True), ('medusa(1,1,1)', True),
      ('medusa_typical(1,1,1)', False), ('eagle(dynamic:2,3,6)', True),
      ('autoregressive(mtp model)', True), ('mtp(1,1)', True), ('mtp(2,2)', True)]
  assert all(r['matches_ar'] is True for r in records if r['lossless'])
  mtp_ar = records[5]
  assert all(r['speedup_vs_ar'] == r['tokens_per_s'] / mtp_ar['tokens_per_s']
             for r in records[5:])
  assert all(r['mean_accepted'] >= 1.0 for r in records)
