"""Compiled autoregressive decoding: exact arrays on stub logits, a real model, filters,
sharding, recompilation and clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, sampling
from decoding.autoregressive import AutoregressiveConfig
from decoding.sampling import SamplingConfig
from models import sharding
from tests.stub_model import StubConfig, StubModel, random_table, successor_table

EOS = 2
STUB = StubModel(StubConfig(vocab_size=16, padded_vocab_size=16))
TABLE = successor_table(16, 16, last=11, eos=EOS)


def _generate(model, params, prompts, config, seed=0):
  padded, lengths = driver.pad_prompts(prompts)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths),
                                 config, jax.random.PRNGKey(seed))


def test_batch_with_uneven_prompts_eos_and_full_cache():
  config = AutoregressiveConfig(max_new_tokens=6, cache_capacity=9, eos_ids=(EOS,))
  out = _generate(STUB, TABLE, [[3, 4, 5], [9], [4, 7, 3, 8, 10]], config)
  np.testing.assert_array_equal(out.tokens, [
      [3, 4, 5, 6, 7, 8, 9, 10, 11],   # max_new_tokens reached exactly at the capacity
      [9, 10, 11, 2, 0, 0, 0, 0, 0],   # EOS after 3 new tokens
      [4, 7, 3, 8, 10, 11, 2, 0, 0],   # EOS after 2 new tokens
  ])
  np.testing.assert_array_equal(out.lengths, [9, 4, 7])
  np.testing.assert_array_equal(out.new_tokens, [6, 3, 2])
  assert int(out.target_calls) == 6  # prefill + 5 one-token steps for the longest row
  assert out.completions() == [[6, 7, 8, 9, 10, 11], [10, 11, 2], [11, 2]]


def test_rows_stop_at_the_cache_capacity_and_on_any_eos_id():
  config = AutoregressiveConfig(max_new_tokens=50, cache_capacity=8, eos_ids=(EOS, 7))
  out = _generate(STUB, TABLE, [[1, 2, 3], [8], [3, 4, 5, 8, 9, 10, 9]], config)
  assert out.completions() == [[4, 5, 6, 7], [9, 10, 11, 2], [10]]


def test_a_row_decoded_in_a_batch_equals_the_row_alone():
  params = random_table(0, 12, 16)
  model = StubModel(StubConfig(vocab_size=12, padded_vocab_size=16))
  prompts = [[3, 4], [5, 6, 7, 8, 9], [10]]
  for sampling_config in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=5)):
    config = AutoregressiveConfig(max_new_tokens=7, cache_capacity=16,
                                  sampling=sampling_config, eos_ids=(EOS,))
    batch = _generate(model, params, prompts, config).completions()
    if sampling_config.greedy:  # Sampling draws per-batch keys; greedy is key-free.
      for row, prompt in enumerate(prompts):
        assert _generate(model, params, [prompt], config).completions()[0] == batch[row]


def test_greedy_equals_argmax_over_full_forward_passes(trained_tiny):
  model, params = trained_tiny.model, trained_tiny.params
  tok = trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(text)] for text in
             ('import os\n', 'def main(', '    return self.', '"""')]
  config = AutoregressiveConfig(max_new_tokens=20, cache_capacity=40, eos_ids=(tok.eos_id,))
  out = _generate(model, params, prompts, config).completions()
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t, jnp.arange(t.shape[1])[None]).logits)
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    while len(seq) - len(prompt) < 20:
      # The full causal forward pass over the sequence so far (zero-padded to one shape).
      logits = forward(params, jnp.asarray([seq + [0] * (40 - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1, :model.config.vocab_size])))
      if seq[-1] == tok.eos_id:
        break
    assert out[row] == seq[len(prompt):]
  assert len(set(map(tuple, out))) > 1


def test_prompts_of_other_lengths_are_padded_apart_and_decode_as_alone(trained_tiny):
  """Each batch is padded to its own width (launch.generation.prompt_width): a short
  prompt beside a long one is not prefilled at the long one's width, and its tokens are
  the ones it gets decoded alone."""
  from launch import generation
  assert generation.prompt_width(269, 1209) == 512
  assert generation.prompt_width(1041, 1209) == 1209
  assert generation.prompt_width(5, 3) == 3
  tok = trained_tiny.tokenizer
  long_text = 'import os\n' * 40    # > PROMPT_WIDTH_MULTIPLE byte tokens
  prompts = [[tok.bos_id, *tok.encode(t)] for t in ('def main(', long_text, '"""')]
  assert len(prompts[1]) > generation.PROMPT_WIDTH_MULTIPLE
  # One device (the suite simulates 8, whose data axis would put all rows in one batch).
  options = generation.DecodeOptions(max_new_tokens=12, batch_size=1, max_context=512,
                                     weight_layout='per_block')
  together, stats = generation.decode_tokens(trained_tiny, prompts, 'autoregressive', options,
                                             time_prefill=True)
  assert stats['programs'] == 2     # widths 256 (both short prompts) and the long one's
  for prompt, row in zip(prompts, together):
    alone, _ = generation.decode_tokens(trained_tiny, [prompt], 'autoregressive', options)
    assert alone[0] == row


def test_seeded_sampling_is_reproducible_and_seed_dependent():
  params = random_table(1, 12, 16)
  model = StubModel(StubConfig(vocab_size=12, padded_vocab_size=16))
  config = AutoregressiveConfig(max_new_tokens=12, cache_capacity=16, eos_ids=(),
                                sampling=SamplingConfig(temperature=1.0))
  prompts = [[3], [4], [5], [6]]
  a = _generate(model, params, prompts, config, seed=7).completions()
  b = _generate(model, params, prompts, config, seed=7).completions()
  c = _generate(model, params, prompts, config, seed=8).completions()
  assert a == b and a != c


def _kept_sets(logits, vocab_size, config):
  """Reference filters in numpy: the ids each filter keeps, applied in order."""
  logits = np.asarray(logits, np.float64)[:vocab_size] / config.temperature
  keep = np.ones(vocab_size, bool)
  if config.top_k:
    keep &= logits >= np.sort(logits)[::-1][config.top_k - 1]
  if config.top_p < 1:
    probs = np.exp(logits - logits[keep].max()) * keep
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = np.zeros(vocab_size, bool)
    nucleus[order[before < config.top_p]] = True
    keep &= nucleus
  if config.min_p:
    probs = np.exp(logits - logits[keep].max()) * keep
    keep &= probs >= config.min_p * probs.max()
  return keep


@pytest.mark.parametrize('config', [
    SamplingConfig(temperature=1.0, top_k=3),
    SamplingConfig(temperature=0.7, top_p=0.5),
    SamplingConfig(temperature=1.5, min_p=0.2),
    SamplingConfig(temperature=1.0, top_k=6, top_p=0.8, min_p=0.05),
])
def test_filters_never_emit_outside_the_kept_set(config):
  vocab, padded = 12, 16
  params = random_table(2, vocab, padded)
  model = StubModel(StubConfig(vocab_size=vocab, padded_vocab_size=padded))
  decode = AutoregressiveConfig(max_new_tokens=15, cache_capacity=16, eos_ids=(),
                                sampling=config)
  prompts = [[t] for t in range(vocab)] * 3
  table = np.asarray(params['table'])
  seen = np.zeros((padded, padded), bool)
  for seed in range(4):
    out = _generate(model, params, prompts, decode, seed=seed)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(len(prompts)):
      for prev, nxt in zip(tokens[row, :lengths[row] - 1], tokens[row, 1:lengths[row]]):
        seen[prev, nxt] = True
  for prev in range(vocab):
    keep = _kept_sets(table[prev], vocab, config)
    assert not seen[prev, vocab:].any(), 'a padded vocabulary id was sampled'
    assert not (seen[prev, :vocab] & ~keep).any(), f'after {prev}: outside the kept set'
  assert seen.sum() > vocab * 1.5  # sampling did explore


def test_processed_distribution_matches_the_reference_filters():
  logits = jax.random.normal(jax.random.PRNGKey(3), (50, 40)) * 3
  config = SamplingConfig(temperature=0.8, top_k=10, top_p=0.7, min_p=0.1)
  logp = np.asarray(sampling.log_probs(logits, config, vocab_size=37))
  for row in range(50):
    keep = _kept_sets(logits[row], 37, config)
    np.testing.assert_array_equal(np.isfinite(logp[row, :37]), keep)
    assert np.all(np.isneginf(logp[row, 37:]))
    np.testing.assert_allclose(np.exp(logp[row]).sum(), 1.0, rtol=1e-5)


def test_the_loop_compiles_once_per_shape():
  config = AutoregressiveConfig(max_new_tokens=4, cache_capacity=12, eos_ids=(EOS,))
  _generate(STUB, TABLE, [[3, 4], [5, 6]], config)
  traced = StubModel.traces[0]
  for prompts in ([[7, 8], [1, 3]], [[9], [4, 5]], [[3, 3], [8, 2]]):
    _generate(STUB, TABLE, prompts, config, seed=len(prompts[0]))
  assert StubModel.traces[0] == traced


def test_eight_devices_give_the_tokens_of_one(trained_tiny):
  model, params, tok = trained_tiny.model, trained_tiny.params, trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(t)] for t in
             ('import ', 'class A', 'for i in', 'x = [', 'if __name__', 'try:', '# ', 'def f')]
  padded, lengths = driver.pad_prompts(prompts)
  config = AutoregressiveConfig(max_new_tokens=12, cache_capacity=32, eos_ids=(tok.eos_id,))
  single = driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths),
                           config, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(model_parallelism=2)
  placed = jax.device_put(params, sharding.param_shardings(model, mesh))
  batch_sharding = sharding.batch_sharding(mesh, 2)
  with jax.set_mesh(mesh):
    sharded = driver.generate(
        model, placed, jax.device_put(padded, batch_sharding),
        jax.device_put(lengths, sharding.batch_sharding(mesh, 1)), config,
        jax.random.PRNGKey(0))
  assert len(sharded.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_array_equal(sharded.lengths, single.lengths)


def test_chunked_prefill_equals_one_call(trained_tiny):
  """driver.chunked_prefill (the prompt through the trunk `chunk` tokens per call, a
  lax.scan) gives what one call gives: the last prompt position's logits, every
  position's hidden and block outputs, the cache's written slots; ragged rows; decoding
  from it gives the same tokens, on one device and on 8."""
  from models import KVCache
  model, params, tok = trained_tiny.model, trained_tiny.params, trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def main(argv):\n  return 0\n', 'class A:', 'x')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  padded, lengths = driver.pad_prompts(prompts)
  padded, lengths = jnp.asarray(padded), jnp.asarray(lengths)
  assert padded.shape[1] > 3 * 5   # several chunks of 5, the last one partial
  run = jax.jit(lambda p, chunk: driver.chunked_prefill(
      model, p, padded, lengths, KVCache.empty(model.config, 4, 64), chunk, layer_hidden=True),
                static_argnums=1)
  whole, chunked = run(params, 0), run(params, 5)
  assert whole.logits.shape == chunked.logits.shape == (4, 1, model.config.padded_vocab_size)
  np.testing.assert_allclose(chunked.logits, whole.logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(chunked.hidden, whole.hidden, atol=2e-5, rtol=1e-5)
  assert len(chunked.layer_hidden) == len(whole.layer_hidden) == model.config.num_layers
  for a, b in zip(chunked.layer_hidden, whole.layer_hidden):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  width = padded.shape[1]
  for a, b in ((chunked.cache.k, whole.cache.k), (chunked.cache.v, whole.cache.v)):
    np.testing.assert_allclose(a[..., :width, :], b[..., :width, :], atol=2e-5, rtol=1e-5)
  # The last position's logits are the row's own (not another chunk's).
  full = model.apply({'params': params}, padded, jnp.broadcast_to(jnp.arange(width), padded.shape))
  np.testing.assert_allclose(chunked.logits[:, 0], full.logits[jnp.arange(4), lengths - 1],
                             atol=2e-5, rtol=1e-5)

  config = AutoregressiveConfig(max_new_tokens=12, cache_capacity=48, eos_ids=(tok.eos_id,),
                                prefill_chunk=0)
  one = driver.generate(model, params, padded, lengths, config, jax.random.PRNGKey(0))
  config = AutoregressiveConfig(max_new_tokens=12, cache_capacity=48, eos_ids=(tok.eos_id,),
                                prefill_chunk=5)
  chunks = driver.generate(model, params, padded, lengths, config, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(chunks.tokens, one.tokens)
  # The prefill is one of target_calls either way; its forward calls are prefill_calls.
  assert int(chunks.target_calls) == int(one.target_calls)
  assert int(one.stats['prefill_calls']) == 1
  assert int(chunks.stats['prefill_calls']) == -(-width // 5) == driver.prefill_calls(
      model.config, width, 5) > 3
  mesh = sharding.make_mesh(model_parallelism=2)
  placed = jax.device_put(params, sharding.param_shardings(model, mesh))
  with jax.set_mesh(mesh):
    sharded = driver.generate(
        model, placed, jax.device_put(padded, sharding.batch_sharding(mesh, 2)),
        jax.device_put(lengths, sharding.batch_sharding(mesh, 1)), config,
        jax.random.PRNGKey(0))
  np.testing.assert_array_equal(sharded.tokens, one.tokens)


@pytest.mark.parametrize('prompts,capacity,max_new,message', [
    ([[3] * 10], 8, 4, 'longer than the context'),
    ([[3] * 8], 8, 4, 'leaves no room for new tokens'),
    ([[3, 4], []], 8, 4, 'Prompt 1 is empty'),
    ([[3, 99]], 8, 4, 'token id 99, outside the vocabulary'),
    ([[3]], 8, 0, 'max_new_tokens must be > 0'),
])
def test_bad_prompts_are_clear_errors(prompts, capacity, max_new, message):
  padded, lengths = driver.pad_prompts(prompts)
  with pytest.raises(ValueError, match=message):
    driver.check_prompts(padded, lengths, capacity=capacity, vocab_size=16,
                       max_new_tokens=max_new)


@pytest.mark.parametrize('kwargs,message', [
    (dict(temperature=-0.5), 'temperature must be >= 0'),
    (dict(top_p=0.0), r'top_p must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(top_k=-1), 'top_k must be an integer >= 0'),
    (dict(min_p=1.5), r'min_p must be in \[0, 1\]'),
])
def test_bad_sampling_settings_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingConfig(**kwargs)
