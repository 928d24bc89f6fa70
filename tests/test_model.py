"""The trunk: cached incremental decoding equals the full forward pass; masks; options."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import KVCache, Transformer, TransformerConfig, masks
from tests.params import init as params_init


def _model_and_params(seed=0, **overrides):
  config = TransformerConfig(vocab_size=300, **overrides)
  model = Transformer(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = params_init(model, seed, tokens, tokens)
  return config, model, params


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=('return_layer_hidden',))


def _positions(batch, length):
  return jnp.broadcast_to(jnp.arange(length), (batch, length))


def _incremental_logits(model, params, config, tokens, prompt_lengths, capacity, chunk=1):
  """Prefill right-padded prompts of different lengths, then feed the rest of each row
  `chunk` tokens per call. Returns per-row logits for every position: [B, T, V]."""
  # The bookkeeping (which token goes in, which logits come out) is done in numpy on host
  # copies: indexing device arrays here would compile a gather per shape and step.
  batch, total = tokens.shape
  host_tokens = np.asarray(tokens)
  prefill = int(max(prompt_lengths))
  cache = KVCache.empty(config, batch, capacity)
  out = _jit_apply(model)(params, tokens[:, :prefill], _positions(batch, prefill), cache=cache)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  cache = out.cache.replace(lengths=lengths)  # Padding slots are overwritten later.
  logits = np.zeros((batch, total, config.padded_vocab_size), np.float32)
  prefill_logits = np.asarray(out.logits)
  for b, n in enumerate(prompt_lengths):
    logits[b, :n] = prefill_logits[b, :n]
  rows = np.arange(batch)
  step_fn = jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, cache=c))
  for start in range(0, total - min(prompt_lengths), chunk):
    idx = np.asarray(prompt_lengths)[:, None] + start + np.arange(chunk)[None]   # [B, chunk]
    valid = idx < total
    step_tokens = host_tokens[rows[:, None], np.minimum(idx, total - 1)]
    out = step_fn(params, jnp.asarray(step_tokens), jnp.asarray(idx), cache)
    cache = out.cache
    step_logits = np.asarray(out.logits)
    for b in range(batch):
      logits[b, idx[b][valid[b]]] = step_logits[b][valid[b]]
  return logits


@pytest.mark.parametrize('prompt_lengths,total,chunk', [
    ([5, 12, 1], 24, 1),          # uneven prompts, one token per step
    ([7, 3, 10, 4], 26, 3),       # several tokens per call (speculative verification shape)
    ([300, 257], 330, 1),         # prompts of several hundred tokens
])
def test_cached_incremental_forward_matches_full_forward(prompt_lengths, total, chunk):
  config, model, params = _model_and_params()
  batch = len(prompt_lengths)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, total), 3, config.vocab_size)
  full = _jit_apply(model)(params, tokens, _positions(batch, total)).logits
  incremental = _incremental_logits(model, params, config, tokens, prompt_lengths,
                                    capacity=total + 8, chunk=chunk)
  assert np.max(np.abs(incremental - np.asarray(full))) < 1e-4


def test_packed_documents_do_not_see_each_other():
  """With the packed mask and per-document positions, document 2 inside a packed row
  gets exactly the logits it gets alone."""
  config, model, params = _model_and_params()
  doc1 = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 3, 300)
  doc2 = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 3, 300)
  packed = jnp.concatenate([doc1, doc2], axis=1)
  positions = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
  segments = jnp.asarray([[1] * 7 + [2] * 9])
  out = _jit_apply(model)(params, packed, positions, masks.packed_causal_mask(segments)).logits
  alone = _jit_apply(model)(params, doc2, _positions(1, 9)).logits
  np.testing.assert_allclose(out[:, 7:], alone, atol=1e-5)


def test_cache_write_past_capacity_is_dropped_not_clamped():
  """A write beyond the cache's capacity must not overwrite the last valid slots."""
  config, model, params = _model_and_params()
  cache = KVCache.empty(config, 1, 8)
  tokens = jnp.arange(3, 11)[None]
  out = model.apply(params, tokens, _positions(1, 8), cache=cache)
  overflow = model.apply(params, jnp.asarray([[5, 6]]), jnp.asarray([[8, 9]]), cache=out.cache)
  np.testing.assert_array_equal(overflow.cache.k, out.cache.k)


@pytest.mark.parametrize('overrides', [
    dict(tie_embeddings=True), dict(qkv_bias=True), dict(num_kv_heads=1),
    dict(num_kv_heads=4), dict(rope_theta=500_000.0)])
def test_options_keep_cache_consistency(overrides):
  config, model, params = _model_and_params(**overrides)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 3, 300)
  full = _jit_apply(model)(params, tokens, _positions(2, 12)).logits
  incremental = _incremental_logits(model, params, config, tokens, [4, 6], capacity=16)
  assert np.max(np.abs(incremental - np.asarray(full))) < 1e-4
  if overrides.get('tie_embeddings'):
    assert 'lm_head' not in params['params']
  if overrides.get('qkv_bias'):
    assert 'q_bias' in params['params']['layers']['attention']


def test_rope_theta_changes_the_function():
  _, model_a, params = _model_and_params()
  _, model_b, _ = _model_and_params(rope_theta=100.0)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 10), 3, 300)
  a = _jit_apply(model_a)(params, tokens, _positions(1, 10)).logits
  b = _jit_apply(model_b)(params, tokens, _positions(1, 10)).logits
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3


def test_bfloat16_forward_is_close_to_float32():
  _, model32, params = _model_and_params()
  _, model16, _ = _model_and_params(dtype='bfloat16')
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 16), 3, 300)
  a = _jit_apply(model32)(params, tokens, _positions(2, 16))
  b = _jit_apply(model16)(params, tokens, _positions(2, 16))
  assert b.hidden.dtype == jnp.bfloat16 and b.logits.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(a.logits) - np.asarray(b.logits))) < 0.25


def test_outputs_and_logical_axis_names():
  config, model, _ = _model_and_params()
  tokens = jnp.zeros((2, 5), jnp.int32)
  boxed = model.init(jax.random.PRNGKey(0), tokens, tokens)
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['embedding']) == ('vocab', 'embed')
  assert tuple(specs['layers']['attention']['q']) == ('layers', 'embed', 'heads', 'head_dim')
  assert tuple(specs['layers']['mlp']['down']) == ('layers', 'mlp', 'embed')
  out = model.apply(nn.meta.unbox(boxed), tokens, tokens, return_layer_hidden=True)
  assert out.logits.shape == (2, 5, config.padded_vocab_size) and config.padded_vocab_size == 384
  assert out.hidden.shape == (2, 5, config.d_model)
  assert len(out.layer_hidden) == config.num_layers and out.cache is None


def test_bad_head_counts_are_a_clear_error():
  with pytest.raises(ValueError, match='num_kv_heads'):
    TransformerConfig(vocab_size=10, num_heads=4, num_kv_heads=3)


def test_layer_ranges_compose_to_the_whole_model_and_write_only_their_layers():
  """embed -> blocks(0, k) -> blocks(k, L) -> head is the whole forward (early exit and
  layer skipping run ranges); a range writes only its own cache layers."""
  config, model, params = _model_and_params(num_layers=3)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 6), 3, 300)
  positions = _positions(2, 6)
  full = model.apply(params, tokens, positions, cache=KVCache.empty(config, 2, 8))
  x = model.apply(params, tokens, method=model.embed)
  cache = KVCache.empty(config, 2, 8)
  x, cache, first = model.apply(params, x, positions, cache=cache, stop=1, method=model.blocks)
  assert len(first) == 1 and np.all(np.asarray(cache.k[1:]) == 0)  # layers 1, 2 untouched
  x, cache, rest = model.apply(params, x, positions, cache=cache, start=1, method=model.blocks)
  assert len(rest) == 2 and np.all(np.asarray(cache.lengths) == 0)  # ranges keep nothing
  np.testing.assert_allclose(model.apply(params, x, method=model.head), full.logits, atol=1e-5)
  np.testing.assert_allclose(cache.k, full.cache.k, atol=1e-6)
  with pytest.raises(ValueError, match='outside the 3 blocks'):
    model.apply(params, x, positions, start=2, stop=5, method=model.blocks)


def test_explicit_write_slots_write_anywhere_and_keep_nothing():
  """Non-contiguous write slots (an any-order model) give the same logits as writing the
  same tokens contiguously under the same mask, and leave the valid length alone."""
  config, model, params = _model_and_params()
  tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 4), 3, 300)
  positions = _positions(1, 4)
  append = model.apply(params, tokens, positions, cache=KVCache.empty(config, 1, 12))
  assert int(append.cache.lengths[0]) == 4
  slots = jnp.asarray([[9, 2, 7, 4]])
  mask = np.zeros((1, 4, 12), bool)
  for t in range(4):  # token t sees the slots of tokens 0 .. t
    mask[0, t, np.asarray(slots[0, :t + 1])] = True
  scattered = model.apply(params, tokens, positions, mask, KVCache.empty(config, 1, 12),
                          write_slots=slots)
  assert int(scattered.cache.lengths[0]) == 0
  np.testing.assert_allclose(scattered.logits, append.logits, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scattered.cache.k)[:, 0][:, :, np.asarray(slots[0])],
                             append.cache.k[:, 0, :, :4],
                             atol=1e-6)
  kept = scattered.cache.keep(jnp.asarray([10]))
  assert int(kept.lengths[0]) == 10


def test_attention_over_the_used_prefix_equals_attention_over_the_capacity(monkeypatch):
  """Cached attention reads only the smallest window (128, 256, ..., S) covering the slots
  the mask allows; the logits are those of attention over all S slots, bit for bit,
  whichever window each call lands in (contexts crossing 128 and 256 of S = 300), for
  calls of 1 token (decoding steps: a reduction over the slots once rounded differently
  by window there) and of 40. (Calls of 2 tokens can differ in the last bit: 1.2e-6 on
  these logits; models/transformer._attend.)"""
  from models import transformer
  config, model, params = _model_and_params()
  tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 290), 3, 300)
  assert transformer.attention_windows(300) == (128, 256, 300)
  windowed = {chunk: _incremental_logits(model, params, config, tokens, [100, 60], 300,
                                         chunk=chunk) for chunk in (1, 40)}
  monkeypatch.setattr(transformer, 'MIN_ATTENTION_WINDOW', 10 ** 9)
  assert transformer.attention_windows(300) == (300,)
  for chunk, logits in windowed.items():
    whole = _incremental_logits(model, params, config, tokens, [100, 60], 300, chunk=chunk)
    np.testing.assert_array_equal(logits, whole, err_msg=f'chunk={chunk}')


def test_stacked_layers_convert_to_and_from_the_per_layer_layout():
  """Checkpoints written before the layer scan (block_i, future_i) restore into the
  stacked layout, and the exporters' per-layer view inverts it."""
  from models import transformer
  _, model, params = _model_and_params(num_layers=3, mtp_heads=3)
  params = params['params']
  assert params['layers']['mlp']['up'].shape[0] == 3 and params['future']['mlp']['up'].shape[0] == 2
  old = transformer.unstack_layer_params(params)
  assert {'block_0', 'block_1', 'block_2', 'future_2', 'future_3'} <= set(old)
  assert 'layers' not in old and 'future' not in old
  layers, future = params['layers'], params['future']
  np.testing.assert_array_equal(old['block_1']['attention']['q'], layers['attention']['q'][1])
  np.testing.assert_array_equal(old['future_3']['mlp']['down'], future['mlp']['down'][1])
  back = transformer.stack_layer_params(old)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  jax.tree.map(np.testing.assert_array_equal, transformer.stack_layer_params(params), params)
