"""launch.bench end to end on the tiny model: records, schema, lossless outputs, the
latency split, the verify-cost curve and its cache, real-prompt files per category, and
the other engines' rows (or their skip). Nothing here asserts a speed."""
import json
import os

import pytest

from configs import bench as bench_config
from configs import bench_real
from launch import baselines, benchmarking, generation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_records_and_tables(trained_tiny, tmp_path, quick_verify_cost):
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
  config.cost_tokens = (1, 2, 4)
  config.cost_context = 6
  records = benchmarking.run(config, str(tmp_path))
  with open(tmp_path / 'bench.json') as f:
    saved = json.load(f)
  assert saved['records'] == records
  assert os.path.exists(tmp_path / 'bench.md') and os.path.getsize(tmp_path / 'bench.png') > 0
  keys = {'method', 'lossless', 'batch_size', 'temperature', 'mean_accepted', 'target_calls',
          'tokens_per_s', 'speedup_vs_ar', 'compile_s', 'backend', 'device', 'matches_ar',
          'category', 'engine'}
  assert all(keys <= set(r) for r in records)
  for r in records:
    if r['method'] == 'naive_python_loop':
      continue
    # The latency split: the first token of each prompt is the prefill's.
    assert r['decode_tokens'] == r['new_tokens'] - config.num_prompts
    assert r['prefill_ms'] > 0 and r['decode_tokens_per_s'] > 0 and r['peak_rss_mb'] > 0
    assert r['decode_s'] <= r['wall_s']
    assert r['weight_layout'] == 'stacked'   # 8 devices: a mesh decodes stacked
  # The verify-cost curve: per batch size, T = 1, 2, 4, relative to T = 1, plotted, and
  # cached in the target's workdir under its key.
  (curve,) = saved['verify_cost']
  assert curve['tokens'] == [1, 2, 4] and curve['relative'][0] == 1.0
  assert curve['batch_size'] == 3 and curve['context'] == 6 and curve['capacity'] == 20
  assert len(curve['ms']) == 3 and all(m > 0 for m in curve['ms'])
  assert os.path.getsize(tmp_path / 'verify_cost.png') > 0
  cached = benchmarking.load_verify_cost(trained_tiny, 3, 6, 20)
  assert cached == dict(zip(curve['tokens'], curve['relative']))
  assert benchmarking.load_verify_cost(trained_tiny, 5, 6, 20) is None  # another batch size
  with pytest.MonkeyPatch.context() as patch:   # the trunk's code changed: the curve is stale
    patch.setattr(benchmarking, '_trunk_digest', lambda: 'changed')
    assert benchmarking.load_verify_cost(trained_tiny, 3, 6, 20) is None
  assert 'Verify cost' in (tmp_path / 'bench.md').read_text()
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
  # Nothing here reads the latency split or the verify-cost curve (both are checked in
  # test_bench_records_and_tables): no prefill-only programs, no curve measurement.
  config.time_prefill = False
  config.verify_cost = False
  # On one device, as launch.bench runs on a CPU (the 8-device mesh is
  # test_bench_records_and_tables'): its programs compile once and reload from the
  # tests' compilation cache.
  config.weight_layout = 'per_block'
  records = benchmarking.run(config, str(tmp_path))
  assert all(r['weight_layout'] == 'per_block' for r in records)
  assert [(r['method'], r['lossless']) for r in records] == [
      ('autoregressive', True), ('medusa(2,2)', True), ('medusa(1,1,1)', True),
      ('medusa_typical(1,1,1)', False), ('eagle(dynamic:2,3,6)', True),
      ('autoregressive(mtp model)', True), ('mtp(1,1)', True), ('mtp(2,2)', True)]
  assert all(r['matches_ar'] is True for r in records if r['lossless'])
  mtp_ar = records[5]
  assert all(r['speedup_vs_ar'] == r['tokens_per_s'] / mtp_ar['tokens_per_s']
             for r in records[5:])
  assert all(r['mean_accepted'] >= 1.0 for r in records)


def test_verify_cost_api(trained_tiny, tmp_path, monkeypatch):
  """verify_cost_curve measures (T up to 4), caches under its key, reuses the cache and
  refuses impossible settings before measuring."""
  import dataclasses
  import shutil
  workdir = tmp_path / 'model'
  shutil.copytree(trained_tiny.workdir, workdir,
                  ignore=shutil.ignore_patterns(benchmarking.VERIFY_COST_FILE))
  restored = dataclasses.replace(trained_tiny, workdir=str(workdir))
  curve = benchmarking.verify_cost_curve(restored, 2, context=5, capacity=12, tokens=(1, 2, 4),
                                         seconds=0.01, repeats=1)
  assert sorted(curve) == [1, 2, 4] and curve[1] == 1.0 and all(v > 0 for v in curve.values())
  with open(workdir / benchmarking.VERIFY_COST_FILE) as f:
    (entry,) = json.load(f)
  assert (entry['batch_size'], entry['context'], entry['capacity'], entry['dtype']) == (
      2, 5, 12, 'float32')

  def no_measuring(*args, **kwargs):
    raise AssertionError('measured again although the curve is cached')

  monkeypatch.setattr(benchmarking, 'measure_verify_cost', no_measuring)
  assert benchmarking.verify_cost_curve(restored, 2, context=5, capacity=12,
                                        tokens=(1, 2)) == {1: 1.0, 2: curve[2]}
  monkeypatch.undo()
  with pytest.raises(ValueError, match='capacity'):
    benchmarking.measure_verify_cost(restored, 1, context=10, capacity=12, tokens=(1, 4))
  with pytest.raises(ValueError, match='T = 1'):
    benchmarking.measure_verify_cost(restored, 1, context=2, capacity=12, tokens=(2, 4))


def test_trunk_cost_command_times_the_forward_and_the_ar_step(trained_tiny, tmp_path):
  """launch.trunk_cost on the tiny model: the forward curve (timed by the function the
  bench's verify-cost curve calls) in every orientation of the decoding layout, relative
  to T = 1, and the AR step at each capacity; a context that leaves no room for T is a
  one-line error."""
  import subprocess
  import sys
  out = tmp_path / 'cost.json'
  base = [sys.executable, '-m', 'launch.trunk_cost', f'--workdir={trained_tiny.workdir}',
          '--batch_sizes=1', '--max_T=2']
  done = subprocess.run(base + ['--context=4', '--capacity=8', '--ar_capacities=72,96',
                                f'--json={out}'], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report['forward'] and all(
      f['tokens'] == [1, 2] and f['relative'][0] == 1.0 and min(f['ms']) > 0
      and (f['batch'], f['context'], f['capacity']) == (1, 4, 8) for f in report['forward'])
  assert sorted(report['ar_step']['1'], key=int) == ['72', '96']
  assert all(v['step_ms'] > 0 for v in report['ar_step']['1'].values())
  bad = subprocess.run(base + ['--context=7', '--capacity=8', '--ar_capacities='], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'capacity (8)' in bad.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in bad.stderr
  # Flags are checked before anything is timed.
  for flags, message in ((['--ar_capacities=32'], 'got 32'), (['--max_T=0'], '--max_T'),
                         (['--batch_sizes=0'], '--batch_sizes'),
                         ([f'--json={tmp_path}/no/such.json'], '--json')):
    bad = subprocess.run(base + ['--context=4', '--capacity=8'] + flags, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and message in bad.stderr.strip().splitlines()[-1], flags
    assert 'Traceback' not in bad.stderr and 'forward B=' not in bad.stdout


def test_specbench_mini_prompt_file():
  """The shipped prompt set parses as Spec-Bench question.jsonl with its four categories;
  the code-editing requests start the reply with a code fence (a final assistant message,
  continued), which is what makes SmolLM2-135M answer them in code, not in prose."""
  prompts = generation.read_prompt_file(os.path.join(REPO, bench_real.get_config().prompt_file))
  categories = [p.category for p in prompts]
  assert sorted(set(categories)) == ['code_editing', 'qa', 'rag', 'summarization']
  assert all(categories.count(c) == 4 for c in set(categories))
  assert all(p.id and (p.text or p.messages) for p in prompts)
  code = [p for p in prompts if p.category == 'code_editing']
  assert all(p.messages[-1] == {'role': 'assistant', 'content': '```python\n'} for p in code)
  texts = [p.text or p.messages[0]['content'] for p in prompts]
  assert max(len(t) for t in texts) > 3000  # some prompts of about 1000 tokens


def _real_prompts_config(trained_tiny, tmp_path):
  path = tmp_path / 'question.jsonl'
  lines = [dict(question_id=1, category='code', turns=['def add(a, b):\n  return a + b\n']),
           dict(question_id=2, category='chat', turns=['Hello there, how are you']),
           dict(question_id=3, category='code', turns=['import os\nimport sys\nimport os']),
           dict(question_id=4, category='chat', turns=['What is a tree?', 'And a forest?'])]
  path.write_text('\n'.join(json.dumps(line) for line in lines) + '\n')
  config = bench_real.get_config()
  config.target_workdir = trained_tiny.workdir
  config.prompt_file = str(path)
  config.training_free = False
  config.batch_sizes = (1, 3)
  config.max_new_tokens = 6
  config.prompt_lookup_tokens = 3
  config.verify_cost = False
  return config


def test_bench_real_prompts_per_category(trained_tiny, tmp_path, monkeypatch):
  """Records per category, each category's AR first; transformers rows on the same weights
  where installed (greedy: the same tokens as ours), llama.cpp skipped with a reason where
  llama-cpp-python is absent; the per-category table in bench.md; bench.json written with
  the records so far after each category (partial), replaced by the whole run's."""
  config = _real_prompts_config(trained_tiny, tmp_path)
  snapshots, write_json = [], benchmarking._write_json

  def spy(workdir, records, curves, skipped, partial=False):
    out = write_json(workdir, records, curves, skipped, partial)
    if partial:
      with open(tmp_path / 'out' / 'bench.json') as f:
        snapshots.append(json.load(f))
    return out
  monkeypatch.setattr(benchmarking, '_write_json', spy)
  records = benchmarking.run(config, str(tmp_path / 'out'))
  with open(tmp_path / 'out' / 'bench.json') as f:
    saved = json.load(f)
  assert 'partial' not in saved and len(snapshots) == 4   # 2 categories x 2 batch sizes
  assert all(s['partial'] for s in snapshots)
  assert {r['category'] for r in snapshots[0]['records']} == {'code'}
  assert [len(s['records']) for s in snapshots] == sorted(len(s['records']) for s in snapshots)
  ours = [(r['category'], r['batch_size'], r['method']) for r in records if r['engine'] == 'ours']
  assert ours == [('code', 1, 'autoregressive'), ('chat', 1, 'autoregressive'),
                  ('code', 3, 'autoregressive'), ('chat', 3, 'autoregressive')]
  assert all(r['new_tokens'] <= 3 * 6 and r['prefill_ms'] > 0 for r in records)
  # At batch 3 each category's 2 prompts are cycled to 3 real rows (fill_batches), which
  # every engine decodes and counts: the first token of each of the 3 is the prefill's.
  for r in records:
    if r['batch_size'] == 3:
      assert r['decode_tokens'] == r['new_tokens'] - 3 and r['new_tokens'] > 6, r
  skipped = {s['what']: s['reason'] for s in saved['skipped']}
  hf = [r for r in records if r['engine'] == 'transformers']
  if baselines.unavailable('transformers') is None:
    # batch 1: greedy and prompt lookup; batch 3: greedy only (its drafting is one row).
    assert [(r['category'], r['batch_size'], r['method']) for r in hf] == [
        ('code', 1, 'transformers_generate'), ('code', 1, 'transformers_prompt_lookup(3)'),
        ('chat', 1, 'transformers_generate'), ('chat', 1, 'transformers_prompt_lookup(3)'),
        ('code', 3, 'transformers_generate'), ('chat', 3, 'transformers_generate')]
    assert all(r['matches_ar'] for r in hf if r['batch_size'] == 1)
    assert 'transformers_prompt_lookup(3) batch 3' in skipped
  if baselines.unavailable('llama.cpp') is not None:
    assert 'not installed' in skipped['llama.cpp']
    assert not [r for r in records if r['engine'] == 'llama.cpp']
  else:   # batch 1 only, on an f32 GGUF export of the same weights (config.llama_cpp_gguf '')
    rows = [r for r in records if r['engine'] == 'llama.cpp']
    assert all(r['batch_size'] == 1 and r['engine_weights'] == 'f32 export' for r in rows)
    # This tiny model's byte-level vocabulary has no merges, which the gguf library cannot
    # write (it drops empty arrays) and llama.cpp requires: a skip with the reason.
    assert rows or skipped['llama.cpp'].startswith('failed to load')
  report = (tmp_path / 'out' / 'bench.md').read_text()
  assert '| method | code | chat |' in report and 'Skipped:' in report


def test_bench_skips_an_absent_engine(trained_tiny, tmp_path, monkeypatch):
  """Without transformers the bench still runs ours and says why the row is missing."""
  config = _real_prompts_config(trained_tiny, tmp_path)
  config.batch_sizes = (1,)
  config.time_prefill = False
  real = baselines.unavailable
  monkeypatch.setattr(baselines, 'unavailable', lambda engine: (
      'transformers, torch not installed (pip install -e .[hf])' if engine == 'transformers'
      else real(engine)))
  records = benchmarking.run(config, str(tmp_path / 'out'))
  assert {r['engine'] for r in records} == {'ours'}
  assert all('prefill_ms' not in r for r in records)
  with open(tmp_path / 'out' / 'bench.json') as f:
    skipped = {s['what']: s['reason'] for s in json.load(f)['skipped']}
  assert skipped['transformers'].startswith('transformers, torch not installed')


def test_category_table_puts_the_cost_models_choices_in_one_row():
  rows = [dict(method=m, category=c, batch_size=1, temperature=0.0, decode_speedup_vs_ar=v)
          for m, c, v in (('autoregressive', 'code', 1.0), ('autoregressive', 'text', 1.0),
                          ('lookup auto(num_draft=0)', 'code', 0.97),
                          ('lookup auto(num_draft=8)', 'text', 1.6))]
  table = benchmarking.category_table(rows)
  assert '| lookup auto | 0.97 (num_draft=0) | 1.60 (num_draft=8) |' in table
  assert table.count('lookup auto') == 1


def test_fill_batches_cycles_prompts_to_whole_batches():
  assert benchmarking.fill_batches(['a', 'b'], 1) == ['a', 'b']
  assert benchmarking.fill_batches(['a'], 8) == ['a'] * 8
  assert benchmarking.fill_batches(['a', 'b', 'c'], 2) == ['a', 'b', 'c', 'a']
  assert benchmarking.fill_batches(['a', 'b'], 2) == ['a', 'b']


def test_auto_variants_of_the_bench():
  import ml_collections
  config = ml_collections.ConfigDict(dict(trees={'speculative': ('', '3,2')}, typical=(),
                                          auto=('speculative', 'lookup')))
  assert benchmarking._method_variants(config, ['autoregressive', 'speculative', 'lookup']) == [
      ('autoregressive', '', False, False), ('speculative', '', False, False),
      ('speculative', '3,2', False, False), ('speculative', '', False, True),
      ('lookup', '', False, False), ('lookup', '', False, True)]
  config.auto = ('medusa',)   # --tree=auto: the size of the heads' static tree
  assert benchmarking._method_variants(config, ['medusa'])[-1] == ('medusa', '', False, True)
  config.auto = ('lookahead',)
  with pytest.raises(ValueError, match='lookahead has no draft length or tree size'):
    benchmarking._method_variants(config, ['lookahead'])


def test_a_bad_llama_cpp_kv_cache_type_is_an_error_not_a_skip(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict(dict(baselines=('llama.cpp',), llama_cpp_kv_cache='q4'))
  with pytest.raises(ValueError, match="llama_cpp_kv_cache='q4' is not one of f16, f32"):
    benchmarking._engines(config, None, 64, str(tmp_path), {})


@pytest.mark.parametrize('batch_sizes', [(0,), (1, -1), ()])
def test_batch_sizes_below_one_are_an_error(batch_sizes, tmp_path):
  config = bench_real.get_config()
  config.batch_sizes = batch_sizes
  config.target_workdir = str(tmp_path / 'never read')
  with pytest.raises(ValueError, match='expected one or more rows per call, each >= 1'):
    benchmarking.run(config, str(tmp_path))
