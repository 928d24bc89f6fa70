"""Any-subset AR models (AS-ARM) and ASSD: the two-stream objective's left-to-right case
is the AR loss, ASSD is lossless (G-tests against exact enumeration, with power checks)
for continuation and infilling, greedy ASSD is greedy sequential decoding, rows, 8
devices (decoding and the train step), bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import any_subset, autoregressive, driver, verify
from decoding.sampling import SamplingConfig, log_probs
from models import AnySubsetLM, TransformerConfig
from tests.test_speculative import _g_test
from training.objectives import any_subset as objective_lib
from training.objectives.base import next_token_nll
from tests.sharded import generate_on_mesh
from tests.params import init as params_init

EOS = 2


def _tiny(seed, vocab, scale=4.0):
  """A random AS-ARM (vocab includes [MASK] = vocab - 1); its weights scaled up so that
  its distributions are far from uniform and its greedy choices vary."""
  model = AnySubsetLM(TransformerConfig(vocab_size=vocab, vocab_multiple=8))
  z = jnp.zeros((1, 1), jnp.int32)
  params = params_init(model, seed, z, z)['params']
  return model, jax.tree.map(lambda x: x * scale, params)


MODEL = _tiny(0, 13)
SMALL = _tiny(1, 6, scale=2.0)   # tokens 0..4, [MASK] = 5: exact enumeration


def _run(model_params, prompts, config, seed=0, width=None):
  model, params = model_params
  padded, lengths = driver.pad_prompts(prompts)
  if width:  # One padded width for calls that should share a compilation.
    padded = np.pad(padded, ((0, 0), (0, width - padded.shape[1])))
  return any_subset.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                             jax.random.PRNGKey(seed))


def _batch(inputs, lengths):
  """An AR batch of one document per row: inputs [B, T], real lengths [B]."""
  inputs = jnp.asarray(inputs, jnp.int32)
  rows, length = inputs.shape
  real = jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]
  targets = jnp.pad(inputs[:, 1:], ((0, 0), (0, 1)))
  loss_mask = real & jnp.pad(real[:, 1:], ((0, 0), (0, 1)))
  return {'inputs': inputs, 'targets': targets,
          'positions': jnp.broadcast_to(jnp.arange(length), inputs.shape),
          'segment_ids': real.astype(jnp.int32), 'loss_mask': loss_mask.astype(jnp.int32),
          'target_bytes': loss_mask.astype(jnp.int32)}


def test_left_to_right_loss_is_the_ar_loss_on_the_same_batch():
  """The objective in the left-to-right order (one two-stream forward) equals the AR
  loss (next_token_nll) of the logits a plain causal forward gives over [x_0 .. x_t,
  [MASK] at t + 1] for every t: p(x_{t+1} | x_<=t), each t its own sequence."""
  model, params = MODEL
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, model.mask_id, (2, 9))
  batch = _batch(inputs, [9, 6])
  objective = objective_lib.AnySubsetObjective(model.config, order='l2r')
  sums = objective.sums(params, batch, objective_lib.draw_ranks(
      jax.random.PRNGKey(0), objective_lib.scored_tokens(batch)[0], 'l2r'))
  # Row (t, b): x_0 .. x_t of row b, [MASK] at t + 1, padding after it (which the causal
  # mask hides from the query): one forward for every t.
  rows, length = inputs.shape
  tokens = np.zeros((length, rows, length + 1), np.int32)
  for t in range(length):
    tokens[t, :, :t + 1] = inputs[:, :t + 1]
    tokens[t, :, t + 1] = model.mask_id
  out = model.apply({'params': params}, jnp.asarray(tokens.reshape(-1, length + 1)),
                    jnp.broadcast_to(jnp.arange(length + 1), (length * rows, length + 1)))
  logits = out.logits.reshape(length, rows, length + 1, -1)
  query = logits[jnp.arange(length), :, jnp.arange(length) + 1]            # [T, B, V]
  logits = model.prediction_logits(jnp.swapaxes(query, 0, 1))
  ar = next_token_nll(logits, batch)
  assert float(sums['tokens']) == float(ar['tokens']) == 8 + 5
  np.testing.assert_allclose(float(sums['nll_sum']), float(ar['nll_sum']), rtol=1e-5)
  # Other orders train other factorizations of the same tokens.
  other = objective.sums(params, batch, objective_lib.draw_ranks(
      jax.random.PRNGKey(1), objective_lib.scored_tokens(batch)[0], 'random', 1.0, 1.0))
  assert float(other['tokens']) == 13 and abs(float(other['nll_sum'] - sums['nll_sum'])) > 1e-3


def _exact(model_params, template, sampling):
  """{filled tokens (in order): probability} of sequential any-order sampling, by
  enumeration over the two-stream training forward (no cache): template [T] with
  [MASK] at the targets, filled left to right."""
  model, params = model_params
  template = np.asarray(template)
  targets = np.flatnonzero(template == model.mask_id)
  vocab = model.mask_id
  fills = np.stack(np.meshgrid(*[np.arange(vocab)] * len(targets), indexing='ij'),
                   -1).reshape(-1, len(targets))
  tokens = np.repeat(template[None], len(fills), 0)
  tokens[:, targets] = fills
  ranks = np.zeros_like(tokens)
  ranks[:, targets] = np.arange(1, len(targets) + 1)
  n, length = tokens.shape
  logits = model.apply({'params': params}, jnp.asarray(tokens),
                       jnp.broadcast_to(jnp.arange(length), (n, length)), jnp.asarray(ranks),
                       jnp.ones((n, length), jnp.int32), method=AnySubsetLM.training_logits)
  logp = np.asarray(log_probs(logits, sampling, vocab), np.float64)[:, targets]  # [n, t, V]
  joint = np.exp(np.take_along_axis(logp, fills[..., None], -1)[..., 0].sum(1))
  return {tuple(f): float(p) for f, p in zip(fills.tolist(), joint) if p > 0}


M = SMALL[0].mask_id
CASES = {  # name: (template, prompt, config)
    'continuation': ([1, 3, M, M, M], [1, 3], any_subset.ASSDConfig(
        3, 5, SamplingConfig(temperature=1.0), eos_ids=(), draft=2)),
    'infill': ([1, M, 4, M, M, 0], [1, M, 4, M, M, 0], any_subset.ASSDConfig(
        1, 6, SamplingConfig(temperature=0.8, top_k=4), eos_ids=(), infill=True, draft=3)),
}


@pytest.mark.parametrize('case', list(CASES))
def test_assd_sampling_is_lossless(case, monkeypatch):
  """ASSD's filled tokens follow the model's sequential any-order sampling distribution;
  redrawing from p instead of the residual after a rejection (a wrong rule) fails."""
  template, prompt, config = CASES[case]
  exact = _exact(SMALL, template, config.sampling)
  rows = 20_000

  def sample():
    out = _run(SMALL, [prompt] * rows, config, seed=3)
    start = int(out.prompt_lengths[0])                 # the known set comes first
    filled = np.asarray(out.tokens)[:, start:start + 3]
    return filled, np.asarray(out.stats['accepted_histogram'])

  filled, hist = sample()
  assert hist[1] > 0 and hist[2:].sum() > 0, 'drafts are neither always kept nor rejected'
  assert _g_test(filled, exact) > 1e-3
  jax.clear_caches()
  monkeypatch.setattr(verify, 'residual_log_probs', lambda p, q, log_weight=None: p)
  try:
    assert _g_test(sample()[0], exact) < 1e-3
  finally:
    monkeypatch.undo()
    jax.clear_caches()


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11, 4, 3], [1, 3]]
T = 12  # the [MASK] id of MODEL
TEMPLATES = [[1, T, T, 5, 6, T, 7], [1, 4, T, T, T, T], [T, 3, 9, T, 8], [1, 2, T, 4]]


@pytest.mark.parametrize('k', [1, 8])
def test_greedy_assd_equals_greedy_sequential(k):
  """Ragged prompts and templates, EOS inside an accepted block, the context limit; k = 1
  (the bonus token alone) and k = 8 (longer than most rows' remaining targets)."""
  for prompts, infill in ((PROMPTS, False), (TEMPLATES, True)):
    seq = _run(MODEL, prompts, any_subset.AnyOrderConfig(9, 14, eos_ids=(EOS,), infill=infill))
    out = _run(MODEL, prompts, any_subset.ASSDConfig(9, 14, eos_ids=(EOS,), infill=infill,
                                                     draft=k))
    assert out.completions() == seq.completions()
    np.testing.assert_array_equal(out.stats['sequence'], seq.stats['sequence'])
    if infill:  # Every span filled, nothing past the template touched.
      inside = np.arange(14)[None] < np.asarray([len(t) for t in TEMPLATES])[:, None]
      assert np.all((np.asarray(out.stats['sequence']) == T) == ~inside)
    assert np.all(np.asarray(out.stats['nfe']) <= np.asarray(seq.stats['nfe']) + 1)
  reasons = [r['reason'] for r in out.finish_reasons()]
  assert reasons == ['length'] * 4
  seq = _run(MODEL, PROMPTS, any_subset.AnyOrderConfig(9, 14, eos_ids=(EOS,)))
  assert len({len(c) for c in seq.completions()}) > 1, 'rows end at different points'
  assert len({t for c in seq.completions() for t in c}) > 3, 'a degenerate model'


def test_a_batch_row_equals_the_row_alone():
  config = any_subset.ASSDConfig(8, 12, eos_ids=(EOS,), draft=3)
  both = _run(MODEL, PROMPTS, config).completions()
  assert [both[1], both[2]] == [_run(MODEL, [p], config, width=7).completions()[0]
                                for p in (PROMPTS[1], PROMPTS[2])]   # the shortest, longest


def test_eight_devices_give_the_result_of_one_for_decoding_and_the_train_step(tmp_path):
  from configs import asarm
  from training import objectives, trainer
  model, params = MODEL
  prompts = PROMPTS * 2
  config = any_subset.ASSDConfig(8, 12, eos_ids=(EOS,), draft=3)
  one = _run(MODEL, prompts, config)
  eight = generate_on_mesh(model, params, prompts, config, generate=any_subset.generate)
  assert eight.completions() == one.completions()

  train_config = asarm.get_config('size=tiny')
  train_config.batch_size = 8
  rng = np.random.default_rng(0)
  batch = {k: np.asarray(v) for k, v in _batch(rng.integers(0, 12, (8, 16)), [16] * 8).items()}
  objective = objectives.build(train_config, 12)
  losses = []
  for devices, model_parallelism in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    train_config.model_parallelism = model_parallelism
    setup = trainer.build(train_config, objective, batch, devices)
    state = setup.init_state()
    state, metrics = setup.train_step(state, trainer.to_device(batch, setup.batch_shardings),
                                      setup.frozen)
    losses.append(float(metrics['loss']))
  assert np.isclose(losses[0], losses[1], rtol=1e-5)


def test_bad_input_is_a_one_line_error():
  from launch import generation
  from training.tokenizers import ByteTokenizer
  tok = ByteTokenizer()
  cases = [
      (lambda: any_subset.ASSDConfig(4, 8, draft=0), 'k >= 1'),
      (lambda: generation.infill_template(tok, 'def f():', 300, 8, 64), 'no mask marker'),
      (lambda: generation.infill_template(tok, 'x = <mask:40>\n<mask:40>', 300, 8, 64),
       'context'),
      (lambda: any_subset.check_templates([[1, 2]], [2], 12, 8), 'no span'),
      (lambda: any_subset.generate(*_tiny_ar(), jnp.ones((1, 2), jnp.int32),
                                   jnp.asarray([2]), any_subset.AnyOrderConfig(2, 6),
                                   jax.random.PRNGKey(0)), 'any-subset'),
      (lambda: driver.generate(*MODEL, jnp.ones((1, 2), jnp.int32), jnp.asarray([2]),
                               autoregressive.AutoregressiveConfig(2, 6),
                               jax.random.PRNGKey(0)), 'method=assd'),
  ]
  for call, words in cases:
    with pytest.raises(ValueError, match=words) as error:
      call()
    assert '\n' not in str(error.value)


def _tiny_ar():
  from models import Transformer
  model = Transformer(TransformerConfig(vocab_size=12))
  z = jnp.zeros((1, 1), jnp.int32)
  return model, params_init(model, 0, z, z)['params']
