"""Self-speculation by layer skipping (decoding/self_speculative.py): the layer-skipping
forward, greedy equality with plain decoding, lossless sampling (G-test with power), the
target cache after a round, 8 devices, the registry and clear errors."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, registry
from decoding.sampling import SamplingConfig
from decoding.self_speculative import SKIP_FILE, SelfSpeculativeConfig, exit_skip, parse_skip
from launch import generation
from models import KVCache, Transformer, TransformerConfig
from tests import test_speculative as ts
from tests.sharded import generate_on_mesh
from tests.params import init as params_init

EOS = 2
PROMPTS = ts.PROMPTS


def _tiny(seed, vocab=60, **kw):
  config = TransformerConfig(vocab_size=vocab, **kw)
  model = Transformer(config)
  z = jnp.zeros((1, 1), jnp.int32)
  return model, params_init(model, seed, z, z)['params']


def _identity_block(params, layer):
  """The parameters with block `layer` made the identity (attention and MLP outputs 0)."""
  layers = params['layers']
  attention = dict(layers['attention'], o=layers['attention']['o'].at[layer].set(0.0))
  mlp = dict(layers['mlp'], down=layers['mlp']['down'].at[layer].set(0.0))
  return dict(params, layers=dict(layers, attention=attention, mlp=mlp))


MODEL, PARAMS = _tiny(0, num_layers=4)
# Block 2 is the identity: skipping it drafts exactly the target's tokens, so every round
# accepts all K (EOS and the length cap then fall inside accepted blocks).
EXACT = _identity_block(PARAMS, 2)


def _decode(params, prompts, max_new, capacity, config=None, seed=0, model=MODEL):
  padded, lengths = driver.pad_prompts(prompts)
  config = config or ts.autoregressive.AutoregressiveConfig(max_new, capacity, eos_ids=(EOS,))
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


def _self(max_new, capacity, eos=(EOS,), **kw):
  return SelfSpeculativeConfig(max_new, capacity, eos_ids=eos, **kw)


def test_the_layer_skipping_forward_is_the_model_without_those_blocks():
  tokens = jnp.asarray([[1, 5, 6, 7, 8]])
  positions = jnp.arange(5)[None]
  full = MODEL.apply({'params': EXACT}, tokens, positions)
  for layers in ((0, 1, 3), jnp.asarray([0, 1, 3])):  # static and traced block lists
    skipped = MODEL.apply({'params': EXACT}, tokens, positions, layers=layers)
    np.testing.assert_allclose(skipped.logits, full.logits, atol=1e-5)
  early = MODEL.apply({'params': PARAMS}, tokens, positions, layers=(0, 1))
  x = MODEL.apply({'params': PARAMS}, tokens, method=Transformer.embed)
  x, _, _ = MODEL.apply({'params': PARAMS}, x, positions, stop=2, method=Transformer.blocks)
  np.testing.assert_allclose(early.logits, MODEL.apply({'params': PARAMS}, x,
                                                       method=Transformer.head), atol=1e-5)


@pytest.mark.parametrize('batch,kw', [
    (1, dict(skip_layers=(2, 3), num_draft=3)),       # early exit at block 2
    (4, dict(skip_layers=(1,), num_draft=4)),         # a middle block
    (4, dict(skip_layers=(0, 2), num_draft=2)),       # block 0 skipped: nothing shared
    (4, dict(skip_layers=(3,), num_draft=1))], ids=str)
def test_greedy_equals_plain_greedy(batch, kw):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]
  ar = _decode(PARAMS, prompts, 17, 30)
  out = _decode(PARAMS, prompts, 17, 30, _self(17, 30, **kw))
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  hist = np.asarray(out.stats['accepted_histogram'])
  assert len(hist) == kw['num_draft'] + 1 and hist.sum() > 0


def test_eos_and_the_length_cap_inside_an_accepted_block(k=4):
  prompts = PROMPTS
  plain = _decode(EXACT, prompts, 14, 30, ts.autoregressive.AutoregressiveConfig(
      14, 30, eos_ids=()))
  # An EOS id the target emits as row 0's 3rd new token: inside the first round's block.
  eos = int(plain.tokens[0, len(prompts[0]) + 2])
  for max_new, capacity in ((14, 30), (11, 20), (8, 11)):  # caps inside a block; the last
    ar = _decode(EXACT, prompts, max_new, capacity,          # one fills row 2's capacity
                 ts.autoregressive.AutoregressiveConfig(max_new, capacity, eos_ids=(eos,)))
    out = _decode(EXACT, prompts, max_new, capacity,
                  _self(max_new, capacity, (eos,), skip_layers=(2,), num_draft=k))
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    np.testing.assert_array_equal(out.lengths, ar.lengths)
    hist = np.asarray(out.stats['accepted_histogram'])
    assert hist[:-1].sum() == 0 and hist[-1] > 0  # the exact draft: every block accepted
  assert int(out.lengths[0]) == len(prompts[0]) + 3 and int(out.lengths[2]) == 11


def test_the_target_cache_after_a_round_equals_plain_decoding():
  """After one round (draft into the target cache, reuse of the shared blocks' keys and
  values, verify the rest, keep the accepted), every layer's kept slots equal a plain
  prefill of the same tokens, to 1e-6."""
  capacity = 32
  padded, lengths = driver.pad_prompts(PROMPTS)
  prompts, lengths = jnp.asarray(padded), jnp.asarray(lengths)
  for skip in ((1, 3), (0,)):  # blocks 0 shared; nothing shared
    config = _self(12, capacity, skip_layers=skip, num_draft=3)
    proposer = config.proposer(MODEL, None)

    @jax.jit
    def two_rounds(params, config=config, proposer=proposer):
      state, out = driver.prefill(MODEL, params, prompts, lengths, config, capacity,
                                  jax.random.PRNGKey(0), proposer.max_depth)
      both = driver.Params(target=params)
      state = state.replace(proposer=proposer.start(both, out, prompts, lengths, capacity)[0])
      for _ in range(2):
        state = driver.speculative_round(MODEL, both, proposer, config, capacity, state)
      return state

    state = two_rounds(PARAMS)
    kept = np.asarray(state.lengths) - 1
    assert (kept > np.asarray(lengths)).all()
    np.testing.assert_array_equal(state.target_cache.lengths, kept)
    for row, n in enumerate(kept):
      tokens = state.tokens[row:row + 1, :n]
      plain = MODEL.apply({'params': PARAMS}, tokens, jnp.arange(n)[None],
                          cache=KVCache.empty(MODEL.config, 1, capacity)).cache
      for got, want in ((state.target_cache.k, plain.k), (state.target_cache.v, plain.v)):
        np.testing.assert_allclose(got[:, row, :, :n], want[:, 0, :, :n], atol=1e-6)


def test_sampling_is_lossless(monkeypatch):
  rows, steps, prompt = 20_000, 3, [1, 3]
  sampling = SamplingConfig(temperature=1.0)
  exact = ts._exact_joint(*ts.VOCAB6_TARGET, prompt, steps, sampling, 6)
  config = _self(steps, len(prompt) + steps, (), sampling=sampling, skip_layers=(1,),
                 num_draft=2)
  samples, hist = ts._sampled(config, prompt, rows, 11)
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the draft is neither always right nor wrong'
  assert ts._g_test(samples, exact) > 1e-3
  ts._wrong_rule_fails(monkeypatch, lambda: ts._sampled(config, prompt, rows, 11)[0], exact)


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  config = _self(10, 24, skip_layers=(1, 3), num_draft=3,
                 sampling=SamplingConfig(temperature=1.0))
  single = _decode(PARAMS, prompts, 10, 24, config)
  out = generate_on_mesh(MODEL, PARAMS, prompts, config)
  np.testing.assert_array_equal(out.tokens, single.tokens)


def test_registry_options_and_the_searched_skip_set(trained_tiny, tmp_path):
  texts = ['import os', 'def f(']
  ar = generation.decode_texts(trained_tiny, texts,
                               options=generation.DecodeOptions(max_new_tokens=12))
  layers = trained_tiny.model.config.num_layers
  for kw in (dict(exit_layer=1), dict(skip_layers=str(layers - 1), num_draft=2), {}):
    out = generation.decode_texts(trained_tiny, texts, 'self_speculative',
                                  generation.DecodeOptions(max_new_tokens=12, **kw))
    assert [o['tokens'] for o in out['outputs']] == [o['tokens'] for o in ar['outputs']]
    assert out['stats']['mean_accepted'] >= 1
  # The skip set launch.skip_search writes is the default when no option names one.
  entry = registry.get('self_speculative')
  with open(os.path.join(tmp_path, SKIP_FILE), 'w') as f:
    json.dump({'skip_layers': [0], 'num_draft': 6}, f)
  options = entry.workdir_options(generation.DecodeOptions(), str(tmp_path))
  assert (options.skip_layers, options.num_draft) == ('0', 6)
  given = generation.DecodeOptions(exit_layer=1)
  assert entry.workdir_options(given, str(tmp_path)) == given


def test_bad_input_is_a_clear_error():
  model = MODEL
  make = registry.get('self_speculative').make_config
  options = lambda **kw: generation.DecodeOptions(**kw)
  for kw, message in ((dict(exit_layer=4), r'exit layer 4 is outside \[1, 4\)'),
                      (dict(exit_layer=-1), r'exit layer -1 is outside \[1, 4\)'),
                      (dict(skip_layers='1,7'), r'Skipped block 7 is outside \[0, 4\)'),
                      (dict(skip_layers='0-3'), 'Skipping all 4 blocks'),
                      (dict(skip_layers='1,1'), 'repeat a block'),
                      (dict(skip_layers='two'), 'expected block indices'),
                      (dict(skip_layers='1', exit_layer=2), 'not both')):
    with pytest.raises(ValueError, match=message):
      make(options(**kw), 32, (EOS,), model, None)
  with pytest.raises(ValueError, match='num_draft must be >= 1'):
    _self(4, 8, skip_layers=(1,), num_draft=0)
  with pytest.raises(ValueError, match='at least one skipped block'):
    _self(4, 8)
  with pytest.raises(ValueError, match='--exit_layer is an option of self_speculative'):
    registry.check_options(registry.get('lookup'), options(exit_layer=2))
  assert parse_skip('3,5,9-11') == (3, 5, 9, 10, 11) and exit_skip(2, 4) == (2, 3)


def test_skip_search_finds_the_block_that_does_nothing():
  """alpha of skipping the identity block is exactly 1 (the draft's query reads the
  target's context keys/values and its own at itself), any other block is worse, and the
  greedy search skips it first; the chosen set and draft length are scored."""
  from launch import skip_search
  sequences = [p + list(range(10, 22)) for p in PROMPTS]
  tokens, lengths = driver.pad_prompts(sequences)
  starts = jnp.asarray([len(p) for p in PROMPTS])
  logs = []
  result = skip_search.search(MODEL, EXACT, jnp.asarray(tokens), jnp.asarray(lengths), starts,
                              max_skip=2, width=2, max_draft=4, log=logs.append)
  assert result['single']['2'] == 1.0 and max(result['single'][str(i)] for i in (0, 1, 3)) < 1
  assert result['path'][0] == {'skip': [2], 'alpha': 1.0} and len(result['path']) == 2
  assert 2 in result['skip_layers'] and 1 <= result['num_draft'] <= 4
  tau, speedup = skip_search.predicted(1.0, 4, (2,), 4, 0.0, {1: 1.0, 2: 1.0})
  assert tau == pytest.approx(5.0) and speedup == pytest.approx(5 / (4 * 0.75 + 0.5 + 0.5))
  with pytest.raises(ValueError, match=r'max_skip=4 blocks is outside \[1, 4\)'):
    skip_search.search(MODEL, EXACT, jnp.asarray(tokens), jnp.asarray(lengths), starts,
                       max_skip=4)
