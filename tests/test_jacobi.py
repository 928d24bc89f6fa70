"""Jacobi decoding (decoding/jacobi.py): exact greedy equality with plain decoding, the
call count (never more than AR, fewer on repetitive text), EOS / the length cap / the
capacity inside an accepted window, lossless sampling (G-test with power), 8 devices,
options, and collect_trajectories (CLLM's data: iterates reach the fixed point, which is
greedy AR decoding)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import autoregressive, driver, jacobi, registry
from decoding.sampling import SamplingConfig
from launch import generation
from models import ForwardOutput
from tests.stub_model import StubConfig, StubModel, at_positions
from tests.sharded import generate_on_mesh
from tests.test_speculative import (EOS, PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint,
                                    _g_test, _sampled, _wrong_rule_fails)


def _jacobi(model, params, prompts, max_new, capacity, sampling=SamplingConfig(), seed=0,
            eos_ids=(EOS,), **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = jacobi.JacobiConfig(max_new, capacity, sampling, eos_ids, **kw)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


@dataclasses.dataclass(frozen=True)
class PositionStub(StubModel):
  """The token after position p is table[p]'s argmax, whatever the tokens: a target whose
  predictions never depend on the (possibly wrong) guesses before them, so one Jacobi
  step fixes the whole window."""

  def apply(self, variables, tokens, positions, attention_mask=None, cache=None,
            write_slots=None, logits_at=None):
    del attention_mask
    logits = at_positions(
        variables['params']['table'][jnp.broadcast_to(positions, tokens.shape)], logits_at)
    appended = 0 if write_slots is not None else tokens.shape[1]
    new_cache = None if cache is None else cache.replace(lengths=cache.lengths + appended)
    return ForwardOutput(logits=logits, hidden=jnp.zeros(tokens.shape + (1,)), cache=new_cache)


def _table(next_tokens, vocab=16):
  """[positions, vocab] logits: after position p comes next_tokens[p]."""
  table = np.full((len(next_tokens), vocab), -10.0, np.float32)
  table[np.arange(len(next_tokens)), next_tokens] = 10.0
  return {'table': jnp.asarray(table)}


STUB16 = StubConfig(vocab_size=16, padded_vocab_size=16)


@pytest.mark.parametrize('batch,window', [(1, 3), (4, 1), (4, 5)])
def test_greedy_equals_plain_greedy(batch, window):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _jacobi(*TARGET, prompts, 17, 30, window=window)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  assert len(out.stats['accepted_histogram']) == window + 1


def test_calls_equal_tokens_in_the_worst_case_and_fall_on_repetitive_text():
  """The target is its own fixed-point oracle: each call fixes at least one token. On a
  successor table (t -> t + 1) every guess is conditioned on a wrong one, so each call
  commits exactly one token; once the text repeats one token, whole windows are kept."""
  table = np.full((16, 16), -10.0, np.float32)
  table[np.arange(16), np.minimum(np.arange(16) + 1, 9)] = 10.0    # ... 8 -> 9 -> 9 -> 9
  stub = (StubModel(STUB16), {'table': jnp.asarray(table)})
  out = _jacobi(*stub, [[1]], 6, 20, window=4, eos_ids=())  # 2 .. 7: worst case
  np.testing.assert_array_equal(out.completions(), [[2, 3, 4, 5, 6, 7]])
  assert int(out.target_calls) == 6
  out = _jacobi(*stub, [[5]], 14, 20, window=4, eos_ids=())  # 6 7 8 9 9 9 ...
  np.testing.assert_array_equal(out.completions(), [[6, 7, 8] + [9] * 11])
  assert int(out.target_calls) < 14
  # A random model: never more calls than tokens.
  out = _jacobi(*TARGET, [PROMPTS[0]], 20, 30, window=4, eos_ids=())
  assert int(out.target_calls) <= int(out.new_tokens[0])


def test_eos_length_cap_and_capacity_inside_an_accepted_window():
  """A target that predicts by position: the first step fixes the window, the second
  keeps it whole, so EOS, max_new_tokens and the buffer cut inside an accepted window."""
  nxt = [0, 0] + [5 + i % 11 for i in range(30)]   # after position p: nxt[p]
  eos_at = list(nxt)
  eos_at[6] = EOS                                    # the 5th new token is EOS
  stub = PositionStub(STUB16)
  prompts = [[1, 2, 3]]
  ar = _ar(stub, _table(eos_at), prompts, 12, 16)
  out = _jacobi(stub, _table(eos_at), prompts, 12, 16, window=6)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.completions(), [[5, 6, 7, 8, EOS]])
  assert int(out.target_calls) == 3                  # prefill, the fixing step, the keep
  for max_new, capacity in ((5, 16), (12, 9)):       # the length cap; the buffer (capacity)
    ar = _ar(stub, _table(nxt), prompts, max_new, capacity)
    out = _jacobi(stub, _table(nxt), prompts, max_new, capacity, window=6)
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    np.testing.assert_array_equal(out.lengths, [3 + min(max_new, capacity - 3)])
    assert int(out.target_calls) == 3


@pytest.mark.parametrize('sampling,power', [
    (SamplingConfig(temperature=1.0), True),
    (SamplingConfig(temperature=0.8, top_k=4, top_p=0.9), False)], ids=['t1', 'topk-topp'])
def test_jacobi_sampling_is_lossless(sampling, power, monkeypatch):
  rows, steps, prompt = 20_000, 3, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  config = jacobi.JacobiConfig(steps, len(prompt) + steps, sampling=sampling, eos_ids=(),
                               window=2)

  samples, hist = _sampled(config, prompt, rows, 7)
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the guesses are neither always right nor wrong'
  assert _g_test(samples, exact) > 1e-3
  if power:  # A wrong rule (p not renormalised after a rejected guess) must fail.
    _wrong_rule_fails(monkeypatch, lambda: _sampled(config, prompt, rows, 7)[0], exact)


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  single = _jacobi(*TARGET, prompts, 10, 24, window=3)
  out = generate_on_mesh(*TARGET, prompts, jacobi.JacobiConfig(10, 24, eos_ids=(EOS,), window=3))
  np.testing.assert_array_equal(out.tokens, single.tokens)


def test_trained_model_through_the_registry_equals_autoregressive(trained_tiny):
  texts = ['import os\n', 'def f(', '    return ', '        self.']
  plain = generation.decode_texts(trained_tiny, texts,
                                  options=generation.DecodeOptions(max_new_tokens=20))
  got = generation.decode_texts(trained_tiny, texts, 'jacobi',
                                generation.DecodeOptions(max_new_tokens=20, jacobi_window=5))
  assert [o['tokens'] for o in got['outputs']] == [o['tokens'] for o in plain['outputs']]
  assert got['stats']['lossless'] and len(got['stats']['accepted_histogram']) == 6


def test_bad_options_are_one_line_errors():
  for window in (0, jacobi.MAX_WINDOW + 1):
    with pytest.raises(ValueError, match=r'jacobi_window must be in \[1, 64\]'):
      jacobi.JacobiConfig(4, 8, window=window)
  with pytest.raises(ValueError, match='--num_draft is an option of .*not of --method=jacobi'):
    registry.check_options(registry.get('jacobi'), generation.DecodeOptions(num_draft=7))
  model, params = TARGET
  prompts, lengths = driver.pad_prompts(PROMPTS)
  kw = dict(block_size=4, num_blocks=2, max_iterations=5, rng=jax.random.PRNGKey(0))
  for change, message in ((dict(block_size=0), 'block_size must be an integer >= 1'),
                          (dict(init='zeros'), 'init must be one of'),
                          (dict(max_iterations=0), 'max_iterations must be')):
    with pytest.raises(ValueError, match=message):
      jacobi.collect_trajectories(model, params, prompts, lengths, **{**kw, **change})
  with pytest.raises(ValueError, match='prompt_lengths must be in'):
    jacobi.collect_trajectories(model, params, prompts, lengths * 0, **kw)


@pytest.mark.parametrize('init', ['context', 'repeat'])
def test_collect_trajectories_reaches_greedy_ar_fixed_points(init):
  model, params = TARGET
  block, blocks, iterations = 4, 3, 5  # iterations = block + 1
  padded, lengths = driver.pad_prompts(PROMPTS)
  out = jacobi.collect_trajectories(model, params, padded, lengths, block_size=block,
                                    num_blocks=blocks, max_iterations=iterations,
                                    rng=jax.random.PRNGKey(1), init=init)
  rows = len(PROMPTS) * blocks
  width = padded.shape[1] + (blocks - 1) * block
  assert out['context'].shape == (rows, width) and out['states'].shape == (rows, iterations,
                                                                           block)
  assert out['fixed_point'].shape == (rows, block) and out['iterations'].dtype == np.int32
  ar = driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths),
                       autoregressive.AutoregressiveConfig(block * blocks, width + block,
                                                           eos_ids=()),
                       jax.random.PRNGKey(0))   # EOS is not special in trajectories
  ar_new = np.asarray(ar.tokens)
  forward = jax.jit(lambda t: model.apply({'params': params}, t,
                                          jnp.arange(t.shape[1])[None]).logits)
  for b, prompt in enumerate(PROMPTS):
    new = ar_new[b, len(prompt):len(prompt) + block * blocks]
    for k in range(blocks):
      r = b * blocks + k
      n = out['context_lengths'][r]
      assert n == len(prompt) + k * block
      np.testing.assert_array_equal(out['context'][r, :n], list(prompt) + new[:k * block].tolist())
      assert not out['context'][r, n:].any()
      np.testing.assert_array_equal(out['fixed_point'][r], new[k * block:(k + 1) * block])
      m = int(out['iterations'][r])
      assert 0 <= m <= block
      states = out['states'][r]       # J = block + 1 keeps every iterate
      np.testing.assert_array_equal(states[m:], np.broadcast_to(out['fixed_point'][r],
                                                                states[m:].shape))
      for j in range(m):  # each iterate is the Jacobi update of the one before
        assert (states[j] != out['fixed_point'][r]).any()
        logits = forward(jnp.asarray([out['context'][r, :n].tolist() + states[j].tolist()]))
        update = np.argmax(np.asarray(logits)[0, n - 1:n - 1 + block, :model.config.vocab_size],
                           -1)
        np.testing.assert_array_equal(states[j + 1], update)
  if init == 'repeat':  # The guess is the context's last token repeated.
    np.testing.assert_array_equal(
        out['states'][:, 0], np.repeat(out['context'][np.arange(rows),
                                                      out['context_lengths'] - 1][:, None],
                                       block, axis=1))
