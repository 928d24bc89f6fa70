"""Weight-only quantized weights (models/quant.py): each format against its reference
dequantization, the trunk on quantized parameters against its dequantized float twin,
GGUF blocks kept quantized (training/gguf_io.py), post-training quantization of a
workdir, lossless speculation over a quantized target, bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip('gguf', reason='GGUF tests need the gguf library (pip install gguf)')
pytest.importorskip('qwix', reason='quantization uses qwix (pip install qwix)')

from decoding import driver  # noqa: E402
from decoding.sampling import SamplingConfig  # noqa: E402
from decoding.speculative import SpeculativeConfig  # noqa: E402
from launch import conversion, generation  # noqa: E402
from models import quant, sharding  # noqa: E402
from tests import test_gguf, test_speculative as ts  # noqa: E402
from training import checkpoints, gguf_io  # noqa: E402

REPO = test_gguf.REPO


def _reference_dequantize(weight: dict) -> np.ndarray:
  """numpy: qvalue * scale (+ min), each repeated over its tile."""
  q = np.asarray(weight['qvalue']).astype(np.float32)
  out = q.copy()
  parts = [('scale', np.multiply)] + ([('min', np.add)] if 'min' in weight else [])
  for key, op in parts:
    small = np.asarray(weight[key]).astype(np.float32)
    for axis, (n, s) in enumerate(zip(q.shape, small.shape)):
      small = np.repeat(small, n // s, axis=axis)
    out = op(out, small) if key == 'min' else q * small
  return out


def _matmul_matches(weight, float_weight, spec, x_shape):
  x = jax.random.normal(jax.random.PRNGKey(3), x_shape)
  got = jnp.einsum(spec, x, quant.as_float(weight, jnp.float32))
  want = jnp.einsum(spec, x, jnp.asarray(float_weight))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_post_training_formats_round_to_nearest_and_match_the_reference(fmt):
  rng = np.random.RandomState(0)
  for name, shape, spec, x_shape in (('up', (2, 64, 96), 'LBD,LDF->LBF', (2, 3, 64)),
                                     ('o', (2, 4, 32, 48), 'LBNH,LNHD->LBD', (2, 3, 4, 32))):
    w = rng.randn(*shape).astype(np.float32)
    qw = quant.quantize(jnp.asarray(w), name, fmt, group=16)
    ref = _reference_dequantize(qw)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qw)), ref)
    assert qw['qvalue'].dtype == jnp.int8   # 4-bit values held in bytes (quant.compute_form)
    assert np.abs(np.asarray(qw['qvalue'], np.int32)).max() in ((127, 128) if fmt == 'int8'
                                                                else (7, 8))
    if fmt == 'int8':   # one scale per output channel: size 1 on the contracted axes
      assert qw['scale'].shape == ((2, 1, 96) if name == 'up' else (2, 1, 1, 48))
    else:               # groups of 16 inputs (along H for o: never across heads)
      assert qw['scale'].shape == ((2, 4, 96) if name == 'up' else (2, 4, 2, 48))
    # Round to nearest: every weight within half a step (its scale) of its dequantized value.
    step = _reference_dequantize({'qvalue': np.ones(shape, np.int8), 'scale': qw['scale']})
    assert np.all(np.abs(w - ref) <= 0.5 * step * (1 + 1e-4))
    _matmul_matches(qw, ref, spec, x_shape)


@pytest.mark.parametrize('fmt', ['q8_0', 'q4_0', 'q4_1'])
def test_gguf_blocks_dequantize_as_ggml_does(fmt):
  """Blocks written by gguf's quantizer, read by ours: exactly ggml's dequantization."""
  qtype = gguf.GGMLQuantizationType[fmt.upper()]
  w = np.random.RandomState(1).randn(48, 96).astype(np.float32)   # HF [out, in]
  raw = gguf.quants.quantize(w, qtype)
  want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32)
  blocks = gguf_io.quantized_blocks(raw, fmt.upper(), w.shape)
  assert blocks['scale'].shape == (48, 3) and blocks['scale'].dtype == np.float16
  assert ('min' in blocks) == (fmt == 'q4_1')
  assert blocks['qvalue'].min() >= (-8 if fmt != 'q8_0' else -128)
  np.testing.assert_array_equal(_reference_dequantize(blocks), want)
  # In our layout ([in, out] for 'up': groups along axis 0) through the trunk's matmul.
  ours = gguf_io._convert_quantized(blocks, lambda a: a.T, 0, None)
  ours = {k: jnp.asarray(v) for k, v in ours.items()}
  np.testing.assert_array_equal(np.asarray(quant.dequantize(ours)), want.T)
  _matmul_matches(ours, want.T, 'BD,DF->BF', (3, 96))


@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_quantized_trunk_equals_its_dequantized_float_twin(fmt):
  """Logits (no cache) and greedy decoding (KV cache, lax.while_loop) of the trunk on
  quantized parameters equal those on their dequantized float32 copy."""
  model, params = ts.TARGET
  qparams = quant.quantize_params(params, fmt, group=16)
  assert quant.is_quantized(qparams['layers']['mlp']['down'])
  assert quant.is_quantized(qparams['embedding']) and not quant.is_quantized(
      qparams['layers']['attention_norm']['scale'])
  twin = quant.dequantize_params(qparams)
  tokens = jnp.asarray([ts.PROMPTS[2]])
  positions = jnp.arange(tokens.shape[1])[None]
  np.testing.assert_allclose(model.apply({'params': qparams}, tokens, positions).logits,
                             model.apply({'params': twin}, tokens, positions).logits,
                             rtol=1e-5, atol=1e-5)
  quantized = ts._ar(model, qparams, ts.PROMPTS, 12, 24)
  np.testing.assert_array_equal(quantized.tokens, ts._ar(model, twin, ts.PROMPTS, 12, 24).tokens)
  assert quant.weight_bytes(qparams) < quant.weight_bytes(params) / 3


def test_lossless_methods_on_a_quantized_target():
  """A quantized target decoded by speculative decoding (float draft, chain and tree; its
  own quantized copy as the draft) gives its own greedy tokens, on 8 devices too; a
  quantized draft leaves a float target's tokens unchanged."""
  model, params = ts.TARGET
  target = (model, quant.quantize_params(params, 'int4', group=16))
  qdraft = (ts.DRAFT[0], quant.quantize_params(ts.DRAFT[1], 'int8'))
  ar = ts._ar(*target, ts.PROMPTS, 15, 28)
  for draft, kw in ((ts.DRAFT, dict(num_draft=3)), (target, dict(num_draft=4)),
                    (ts.DRAFT, dict(tree=ts.TreeSpec((3, 2))))):
    out = ts._spec(target, draft, ts.PROMPTS, 15, 28, **kw)
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    np.testing.assert_array_equal(out.lengths, ar.lengths)
  float_ar = ts._ar(*ts.TARGET, ts.PROMPTS, 15, 28)
  out = ts._spec(ts.TARGET, qdraft, ts.PROMPTS, 15, 28, num_draft=3)
  np.testing.assert_array_equal(out.tokens, float_ar.tokens)
  # 8 simulated devices (data x model): the quantized weights' placement follows the float one.
  mesh = sharding.make_mesh(model_parallelism=2)
  padded, lengths = driver.pad_prompts(ts.PROMPTS * 2)
  place = lambda m, p: jax.device_put(p, sharding.param_shardings(m, mesh, params=p))
  with jax.set_mesh(mesh):
    out = driver.generate(
        target[0], place(*target), jax.device_put(padded, sharding.batch_sharding(mesh, 2)),
        jax.device_put(lengths, sharding.batch_sharding(mesh, 1)),
        SpeculativeConfig(15, 28, eos_ids=(ts.EOS,), num_draft=3), jax.random.PRNGKey(0),
        qdraft[0], place(*qdraft))
  np.testing.assert_array_equal(out.tokens, np.concatenate([ar.tokens, ar.tokens]))


def test_speculative_sampling_over_a_quantized_target_is_its_distribution(monkeypatch):
  """G-test against exact enumeration of the QUANTIZED target's own distribution, with a
  quantized draft; the power check: a wrong residual rule fails it."""
  model, params = ts.VOCAB6_TARGET
  qtarget = quant.quantize_params(params, 'int4', group=16)
  qdraft = (ts.VOCAB6_DRAFT[0], quant.quantize_params(ts.VOCAB6_DRAFT[1], 'int8'))
  monkeypatch.setattr(ts, 'VOCAB6_TARGET', (model, qtarget))
  rows, steps, prompt = 20_000, 3, [1, 3]
  sampling = SamplingConfig(temperature=1.0)
  exact = ts._exact_joint(model, qtarget, prompt, steps, sampling, 6)
  exact_float = ts._exact_joint(model, params, prompt, steps, sampling, 6)
  assert max(abs(exact[k] - exact_float.get(k, 0)) for k in exact) > 1e-4  # not the float model
  config = SpeculativeConfig(steps, len(prompt) + steps, sampling=sampling, eos_ids=(),
                             num_draft=2)
  samples, hist = ts._sampled(config, prompt, rows, 11, *qdraft)
  assert hist[0] > 0 and hist[1:].sum() > 0
  assert ts._g_test(samples, exact) > 1e-3
  ts._wrong_rule_fails(monkeypatch, lambda: ts._sampled(config, prompt, rows, 11, *qdraft)[0],
                       exact)


def _first_divergence(a, b):
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None


@pytest.mark.parametrize('qtype', ['Q4_1', 'Q4_0', 'Q8_0'])
def test_keep_quantized_import_of_a_small_gguf(qtype, tmp_path):
  """A small GGUF of `qtype` imported kept quantized: int blocks in the checkpoint, logits
  equal to the dequantizing import's to float32 rounding, the same greedy tokens
  through launch.generation (padded vocabulary, tied embedding, 2 layers stacked)."""
  path = test_gguf._write(tmp_path / 'q.gguf', layers=2,
                          tensor_type=gguf.GGMLQuantizationType[qtype])
  plain = conversion.import_gguf(path, str(tmp_path / 'plain'))
  kept = conversion.import_gguf(path, str(tmp_path / 'kept'), keep_quantized=True)
  up = kept.params['layers']['mlp']['up']
  assert up['qvalue'].dtype == jnp.int8   # 4-bit values held in bytes
  assert (np.abs(np.asarray(up['qvalue'], np.int32) + 0.5).max() <= 8) == (qtype != 'Q8_0')
  assert up['scale'].shape == (2, 1, 64) and ('min' in up) == (qtype == 'Q4_1')
  assert quant.is_quantized(kept.params['embedding'])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               quant.dequantize_params(kept.params), plain.params)
  ids = np.random.RandomState(1).randint(3, 32, (2, 12))
  np.testing.assert_allclose(test_gguf._logits(kept, ids), test_gguf._logits(plain, ids),
                             rtol=1e-5, atol=1e-5)
  prompts = [[1, 5, 6, 7], [1, 9]]
  options = generation.DecodeOptions(max_new_tokens=16)
  want, _ = generation.decode_tokens(plain, prompts, 'autoregressive', options)
  got, _ = generation.decode_tokens(kept, prompts, 'autoregressive', options)
  assert got == want, [_first_divergence(a, b) for a, b in zip(got, want)]
  if qtype == 'Q4_1':  # post-training quantization of a workdir, and its GGUF export
    ptq = conversion.quantize_workdir(plain.workdir, str(tmp_path / 'int8'), 'int8')
    assert ptq.params['layers']['attention']['q']['qvalue'].dtype == jnp.int8
    assert checkpoints.load_config(ptq.workdir).quantization == 'int8'
    conversion.export_gguf(ptq.workdir, str(tmp_path / 'int8.gguf'), 'q8_0')
    again = conversion.import_gguf(str(tmp_path / 'int8.gguf'), str(tmp_path / 'again'))
    assert again.model.config == ptq.model.config


def test_k_quants_are_dequantized_with_a_note_when_kept(tmp_path, capsys):
  """--keep_quantized on a file mixing Q8_0 and Q4_K: the K-quant tensors (no quantized
  form here) are dequantized as the gguf library dequantizes them, each with a printed
  note; the Q8_0 ones stay int8 blocks; logits equal the dequantizing import's."""
  names = ('blk.0.ffn_up.weight', 'blk.0.attn_q.weight')
  path = test_gguf._write(tmp_path / 'k.gguf', d=256, f=512, k_quant_tensors=names,
                          tensor_type=gguf.GGMLQuantizationType.Q8_0)
  plain = conversion.import_gguf(path, str(tmp_path / 'plain'))
  kept = conversion.import_gguf(path, str(tmp_path / 'kept'), keep_quantized=True)
  printed = capsys.readouterr().out
  for name in names:
    assert f'{name}: Q4_K has no quantized form here' in printed, printed
  layers = kept.params['layers']
  assert not quant.is_quantized(layers['mlp']['up'])
  assert not quant.is_quantized(layers['attention']['q'])
  assert quant.is_quantized(layers['mlp']['gate']) and quant.is_quantized(layers['mlp']['down'])
  np.testing.assert_array_equal(np.asarray(layers['mlp']['up']),
                                np.asarray(plain.params['layers']['mlp']['up']))
  assert np.abs(np.asarray(layers['mlp']['up'])).max() > 0.01   # real values, not zeros
  ids = np.random.RandomState(1).randint(3, 32, (2, 12))
  np.testing.assert_allclose(test_gguf._logits(kept, ids), test_gguf._logits(plain, ids),
                             rtol=1e-5, atol=1e-5)


def test_smollm2_kept_quantized_greedy_equals_its_dequantized_import(tmp_path):
  """The package's Q4_1 SmolLM2 decoded from its int4 blocks gives the tokens of the
  same file dequantized to float32 (first divergence reported)."""
  try:
    gguf_io.resolve('smollm2-135m')
  except FileNotFoundError as e:
    pytest.skip(f'{e}')
  prompts = [[1, 1604, 3987, 46477, 24, 94, 727]]
  # One device at batch 1, as `launch.decode` runs on a CPU: the kept file multiplies
  # through the CPU kernel where it is built (8 simulated devices would hold 8 copies).
  options = generation.DecodeOptions(max_new_tokens=20, weight_layout='per_block')
  kept = conversion.import_gguf('smollm2-135m', str(tmp_path / 'kept'), keep_quantized=True)
  got, _ = generation.decode_tokens(kept, prompts, 'autoregressive', options)
  del kept
  plain = conversion.import_gguf('smollm2-135m', str(tmp_path / 'plain'))
  want, _ = generation.decode_tokens(plain, prompts, 'autoregressive', options)
  assert got == want, f'first divergence at {_first_divergence(got[0], want[0])}'


def test_bad_quantization_input_is_one_line(tmp_path):
  w = jnp.ones((2, 48, 96))
  with pytest.raises(ValueError, match=r'^Group size 32 does not divide dimension 48 of up'):
    quant.quantize(w, 'up', 'int4', group=32)
  with pytest.raises(ValueError, match=r"^Cannot post-training quantize to 'q4_1'"):
    quant.quantize(w, 'up', 'q4_1')
  with pytest.raises(ValueError, match=r"^No quantization layout for parameter 'scale'"):
    quant.quantize(w, 'scale', 'int8')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'launch.convert', *args],
                                     capture_output=True, text=True, cwd=REPO)
  result = run('--quantize=int3', '--from_workdir=/nonexistent', f'--workdir={tmp_path}/o')
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.endswith("--quantize='int3'; expected int8 or int4.")


@pytest.mark.parametrize('tied', [True, False])
def test_the_chunked_quantized_lm_head_equals_the_reference(tied):
  """The LM head dequantized chunk by chunk (quant.HEAD_CHUNK vocabulary rows per step)
  gives the logits of the whole dequantized matrix."""
  shape = (2 * quant.HEAD_CHUNK, 64) if tied else (64, 2 * quant.HEAD_CHUNK)
  w = jax.random.normal(jax.random.PRNGKey(0), shape)
  h = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 64))
  for fmt in ('int8', 'int4'):
    qw = quant.quantize(w, 'embedding' if tied else 'lm_head', fmt)
    want = jnp.einsum('BTD,VD->BTV' if tied else 'BTD,DV->BTV', h, _reference_dequantize(qw))
    np.testing.assert_allclose(quant.head_logits(h, qw, tied, jnp.float32), want,
                               rtol=1e-5, atol=1e-5)


def _kernel_or_skip():
  from models import cpu_kernels
  if not cpu_kernels.available():
    pytest.skip('the CPU kernels are not built here (no C++ compiler, no AVX2, or '
                'FASTDECODE_CPU_KERNELS=0)')


def _block_quantized(rng, rows, cols, bits, with_min):
  """A GGUF-like block-quantized [rows, cols] matrix: groups of 32 inputs, float16 scales
  (Q8_0 with bits=8, Q4_0 / Q4_1 with bits=4 as models/quant.py holds them)."""
  low, high = (-8, 8) if bits == 4 else (-128, 128)
  weight = {'qvalue': jnp.asarray(rng.integers(low, high, (rows, cols)), jnp.int8),
            'scale': jnp.asarray(rng.random((rows, cols // 32)) * 0.02, jnp.float16)}
  if with_min:
    weight['min'] = jnp.asarray(rng.standard_normal((rows, cols // 32)) * 0.01, jnp.float32)
  return weight


@pytest.mark.parametrize('bits, with_min', [(4, True), (4, False), (8, False), (8, True)])
def test_the_cpu_kernel_equals_dequantize_then_matmul(bits, with_min):
  """The kernel form (4-bit values packed two per byte, the min folded) dequantizes to the
  weight, and the kernel's product with 1, 5 or 16 rows of activations equals the
  float64 product with the dequantized weight to float32 rounding, for output counts
  that do not split evenly over the threads; more rows than it takes, and weights it
  cannot take (per-channel scales, other ranks), are refused."""
  _kernel_or_skip()
  rng = np.random.default_rng(bits + with_min)
  for rows, cols in ((1, 32), (130, 96), (577, 1536), (3072, 576)):
    weight = _block_quantized(rng, rows, cols, bits, with_min)
    form = quant.kernel_form(weight)
    assert ('qpacked' in form) == (bits == 4) and quant.logical_shape(form) == (rows, cols)
    np.testing.assert_allclose(quant.dequantize(form), _reference_dequantize(weight),
                               rtol=1e-6, atol=1e-7)
    for shape in ((1, 1, cols), (1, 5, cols), (2, quant.KERNEL_MAX_ROWS // 2, cols)):
      x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
      assert quant.kernel_applies(x, form)
      want = np.asarray(x, np.float64) @ _reference_dequantize(weight).astype(np.float64).T
      got = np.asarray(jax.jit(quant.matvec)(x, form))
      np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() + 1e-7)
    assert not quant.kernel_applies(jnp.ones((1, quant.KERNEL_MAX_ROWS + 1, cols)), form)
  per_channel = quant.quantize(jnp.ones((64, 96)), 'lm_head', 'int8')
  assert quant.kernel_form(per_channel) is None
  assert quant.kernel_form({'qvalue': jnp.ones((2, 64, 32), jnp.int8),
                            'scale': jnp.ones((2, 64, 1))}) is None


@pytest.mark.parametrize('bits, with_min', [(4, True), (8, False)])
def test_one_token_calls_at_batch_1_multiply_through_the_cpu_kernel(bits, with_min):
  """The rows decoding layout holds a block-quantized model's fused matrices, o and its
  tied embedding (the LM head) in the kernel form; a one-token call at batch 1 then runs
  the kernel (its custom call in the lowered program) and gives the stacked parameters'
  logits to float32 rounding, a call longer than the kernel takes dequantizes instead
  (same logits), and greedy decoding at batch 1 gives the stacked parameters' tokens."""
  _kernel_or_skip()
  from models import KVCache, transformer
  model, params = ts._tiny(0, num_layers=2, head_dim=32, tie_embeddings=True)
  rng = np.random.default_rng(0)
  qparams = quant.quantize_params(params, 'int4', group=32)

  def regroup(weight):      # the int4 weight's values and groups as a GGUF-like block format
    if not quant.is_quantized(weight):
      return weight
    q = np.asarray(weight['qvalue']).astype(np.int8)
    out = {'qvalue': jnp.asarray(q * 9 if bits == 8 else q),
           'scale': jnp.asarray(weight['scale']) / (9 if bits == 8 else 1)}
    if with_min:
      out['min'] = jnp.asarray(rng.standard_normal(weight['scale'].shape) * 0.01, jnp.float32)
    return out
  qparams = jax.tree.map(regroup, qparams, is_leaf=quant.is_quantized)
  laid = transformer.decoding_layout(qparams, 'rows')
  field = 'qpacked' if bits == 4 else 'qvalue'
  attention, mlp = laid['layers']['attention'], laid['layers']['mlp']
  for weight in (attention['qkv'], attention['o'], mlp['gate_up'], mlp['down']):
    assert field in weight.arrays[0]
  assert field in laid['embedding'] and quant.logical_shape(attention['o'].arrays[0]) == (
      model.config.d_model, model.config.num_heads * model.config.head_dim)
  assert laid['embedding']['scale'].dtype == jnp.float32
  prompt = jnp.asarray([ts.PROMPTS[2]])
  cache = model.apply({'params': qparams}, prompt, jnp.arange(prompt.shape[1])[None],
                      cache=KVCache.empty(model.config, 1, 32)).cache
  token, position = prompt[:, -1:], jnp.asarray([[prompt.shape[1]]])
  step = jax.jit(lambda p, c: model.apply({'params': p}, token, position, cache=c).logits)
  assert 'fastdecode_qmatvec' in step.lower(laid, cache).as_text()
  np.testing.assert_allclose(step(laid, cache), step(qparams, cache), rtol=2e-5, atol=2e-5)
  # a call of more tokens than the kernel takes (a long prefill) dequantizes the same form
  long = jnp.tile(prompt, (1, quant.KERNEL_MAX_ROWS // prompt.shape[1] + 1))
  several = lambda p: model.apply({'params': p}, long, jnp.arange(long.shape[1])[None]).logits
  assert 'fastdecode_qmatvec' not in jax.jit(several).lower(laid).as_text()
  np.testing.assert_allclose(several(laid), several(qparams), rtol=2e-5, atol=2e-5)
  prompts = ts.PROMPTS[2:3]
  np.testing.assert_array_equal(ts._ar(model, laid, prompts, 12, 24).tokens,
                                ts._ar(model, qparams, prompts, 12, 24).tokens)


def test_the_cpu_kernel_build_falls_back_and_repairs(tmp_path):
  """No working compiler: kernels off with a one-line warning (XLA's dot decodes); a
  truncated library in the cache is rebuilt instead of leaving the kernels off."""
  _kernel_or_skip()
  probe = ('import os; from models import cpu_kernels; p = cpu_kernels._library_path(); '
           "open(p, 'w').close() if os.environ.get('TRUNCATE') else None; "
           'print(cpu_kernels.available(), os.path.getsize(p) if os.path.exists(p) else 0)')
  run = lambda cache, **env: subprocess.run(
      [sys.executable, '-c', probe], capture_output=True, text=True, timeout=300,
      env={**os.environ, 'FASTDECODE_KERNEL_CACHE': str(cache), **env},
      cwd=os.path.dirname(os.path.dirname(__file__)))
  broken = run(tmp_path / 'a', CXX='false')
  assert broken.stdout.split() == ['False', '0']
  warnings = [l for l in broken.stderr.splitlines() if 'CPU kernels unavailable' in l]
  assert len(warnings) == 1 and warnings[0].endswith('false exited with status 1')
  (tmp_path / 'b').mkdir()
  repaired = run(tmp_path / 'b', TRUNCATE='1')
  assert repaired.stdout.split()[0] == 'True' and int(repaired.stdout.split()[1]) > 0
