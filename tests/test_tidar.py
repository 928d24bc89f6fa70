"""TiDAR: the decoding call's drafts are the training forward's, exact greedy equality with
the model's own AR decoding (EOS and the length cap inside accepted blocks), lossless
sampling (G-test with power), 8 devices, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import autoregressive, driver, registry, tidar, verify
from decoding.driver import Params
from decoding.proposal import Proposal
from decoding.sampling import SamplingConfig
from models import KVCache, TidarLM, TransformerConfig, masks
from tests.test_eagle3 import eos_some_rows_emit
from tests.test_speculative import PROMPTS, TARGET, _exact_joint, _g_test
from training.objectives.tidar import TidarObjective
from tests.sharded import generate_on_mesh
from tests.params import init as params_init


def _tidar_model(seed, vocab=61, block=4, **kw):
  model = TidarLM(TransformerConfig(vocab_size=vocab, **kw), block_size=block)
  z = jnp.zeros((1, 1), jnp.int32)
  return model, params_init(model, seed, z, z)['params']


MODEL = _tidar_model(0, num_layers=2)


def _decode(model, prompts, max_new, capacity, method='tidar', seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  kw = {'eos_ids': (2,), **kw}
  config = (tidar.TidarConfig(max_new, capacity, **kw) if method == 'tidar'
            else autoregressive.AutoregressiveConfig(max_new, capacity, **kw))
  return driver.generate(model[0], model[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


def test_the_decoding_call_drafts_what_training_trains():
  """Block i of a round's call (accept i drafts) after root = x[7 - i] gives the logits
  the training forward's masked block at positions 8..11 gives (prefix x[:8]); the causal
  part gives plain next-token logits."""
  model, params = MODEL
  block, k = 4, 3
  x = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 3, 60)
  segment_ids, positions = jnp.ones((1, 12), jnp.int32), jnp.arange(12)[None]
  both = jnp.concatenate([x, jnp.full_like(x, model.mask_id)], 1)
  train = model.apply({'params': params}, both, jnp.concatenate([positions] * 2, 1),
                      masks.tidar_training_mask(segment_ids, block)).logits
  plain = model.apply({'params': params}, x, positions).logits
  proposer = tidar.TidarConfig(4, 40).proposer(model, None)
  for i in (0, k):
    root = 7 - i
    cache = model.apply({'params': params}, x[:, :root], positions[:, :root],
                        cache=KVCache.empty(model.config, 1, 40)).cache
    chain = Proposal.chain(x[:, root], x[:, root + 1:root + 1 + k])
    out = proposer.score(model, Params(target=params), chain, root + jnp.arange(k + 1)[None],
                         cache, None)
    np.testing.assert_allclose(out.logits[0], plain[0, root:root + k + 1], atol=1e-4)
    np.testing.assert_allclose(out.future_logits[0, i], train[0, 12 + 9:12 + 12], atol=1e-4)


def test_greedy_equals_its_own_autoregressive_decoding_at_batch_1():
  """(Batch 4, ragged, EOS and length cap inside accepted blocks: the trained test.)"""
  prompts = [PROMPTS[2]]
  ar = _decode(MODEL, prompts, 17, 30, 'autoregressive')
  out = _decode(MODEL, prompts, 17, 30)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  assert int(out.stats['draft_calls']) == 0 and int(out.target_calls) <= int(ar.target_calls)


def test_sampling_is_lossless(chain_rule='block'):
  """A 6-token model (+ mask): the first round commits a token without drafts, then
  rounds of 2 drafts, accepted and rejected (the histogram), match exact enumeration;
  not taking the residual after a rejection fails the same test."""
  model = _tidar_model(5, vocab=7, block=3, num_layers=2)
  sampling, rows, steps, prompt = SamplingConfig(temperature=1.0), 20_000, 4, [1, 3]
  exact = _exact_joint(*model, prompt, steps, sampling, 6)

  def sample():
    out = _decode(model, [prompt] * rows, steps, len(prompt) + steps, seed=3,
                  sampling=sampling, eos_ids=(), chain_rule=chain_rule)
    return np.asarray(out.tokens[:, len(prompt):]), np.asarray(out.stats['accepted_histogram'])

  samples, hist = sample()
  assert hist[0] > 0 and hist[1:].sum() > 0, hist
  assert _g_test(samples, exact) > 1e-3
  jax.clear_caches()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(verify, 'residual_log_probs', lambda p, q, log_weight=None: p)
    assert _g_test(sample()[0], exact) < 1e-3
  jax.clear_caches()


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  kw = dict(sampling=SamplingConfig(temperature=1.0))
  single = _decode(MODEL, prompts, 10, 24, **kw)
  out = generate_on_mesh(*MODEL, prompts, tidar.TidarConfig(10, 24, eos_ids=(2,), **kw))
  np.testing.assert_array_equal(out.tokens, single.tokens)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match='does not fit this TiDAR model\'s block of 4'):
    _decode(MODEL, PROMPTS[:1], 4, 12, num_draft=4)
  with pytest.raises(ValueError, match='num_draft must be >= 1'):
    tidar.TidarConfig(4, 12, num_draft=-1)
  with pytest.raises(ValueError, match='tidar method decodes a TiDAR model.*Transformer'):
    registry.get('tidar').check_model(TARGET[0])
  with pytest.raises(ValueError, match='block_size=1'):
    TidarObjective(MODEL[0].config, 1, 64)
  with pytest.raises(ValueError, match='does not divide seq_len=64'):
    TidarObjective(MODEL[0].config, 3, 64)
  from configs import tidar as tidar_config
  with pytest.raises(ValueError, match='block=1'):
    tidar_config.get_config('size=tiny,block=1')


def test_trained_tidar_drafts_accepted_blocks_and_stops_inside_them(trained_tidar):
  """A tiny TiDAR trained briefly: more than one token per forward, greedy equal to its
  own AR decoding with an EOS id some rows emit and a length cap (batch 4, ragged), and
  the loss metrics of both halves."""
  metrics, trained = trained_tidar
  assert metrics['head1_agree'] > 0.1 and metrics['loss'] < 5, metrics
  tok = trained.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  model = (trained.model, trained.params)
  cap = 23
  plain = _decode(model, prompts, cap, 80, 'autoregressive', eos_ids=())
  # An EOS id some rows emit and others do not: stops inside blocks and the length cap.
  eos = eos_some_rows_emit(plain.completions())
  ar = _decode(model, prompts, cap, 80, 'autoregressive', eos_ids=(eos,))
  out = _decode(model, prompts, cap, 80, eos_ids=(eos,))
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  assert {f['reason'] for f in out.finish_reasons()} == {'stop', 'length'}
  out = _decode(model, prompts, cap, 80, eos_ids=())
  np.testing.assert_array_equal(out.tokens, plain.tokens)
  assert driver.mean_accepted(out.stats['accepted_histogram']) > 1.1
