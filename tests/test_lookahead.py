"""Lookahead decoding (decoding/lookahead.py): exact greedy equality with plain decoding,
lossless sampling (G-test against exact enumeration, with power), the stop rule inside
an accepted block and at the capacity boundary, the pool's provenance, sharding, and
bad settings."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, registry
from decoding.lookahead import LookaheadConfig, LookaheadProposer
from decoding.sampling import SamplingConfig
from launch import generation
from models import ForwardOutput
from tests.stub_model import StubConfig, StubModel, at_positions, random_table
from tests.sharded import generate_on_mesh
from tests.test_speculative import (EOS, PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint,
                                    _g_test, _sampled, _wrong_rule_fails)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lookahead(model, params, prompts, max_new, capacity, sampling=SamplingConfig(), seed=0,
               eos_ids=(EOS,), **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = LookaheadConfig(max_new, capacity, sampling, eos_ids, **kw)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


@pytest.mark.parametrize('batch,kw', [
    (1, dict(window=4, ngram=3, candidates=3)), (4, dict(window=5, ngram=5, candidates=5)),
    (4, dict(window=1, ngram=2, candidates=1)), (4, dict(window=3, ngram=4, candidates=7))],
    ids=str)
def test_greedy_equals_plain_greedy(batch, kw):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _lookahead(*TARGET, prompts, 17, 30, **kw)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  hist = np.asarray(out.stats['accepted_histogram'])
  assert len(hist) == kw['ngram'] and int(out.stats['draft_calls']) == 0
  assert hist[1:].sum() > 0, 'no round accepted a candidate: the test checks nothing'


def test_greedy_on_a_trained_model(trained_tiny):
  model, params, tok = trained_tiny.model, trained_tiny.params, trained_tiny.tokenizer
  prompts = [[tok.bos_id, *tok.encode(t)] for t in ('import os\n', 'def f(', '    return ', '#')]
  ar = _ar(model, params, prompts, 32, 48)
  out = _lookahead(model, params, prompts, 32, 48, window=4, ngram=4, candidates=4)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  hist = np.asarray(out.stats['accepted_histogram'])
  assert hist[1:].sum() > 0 and int(out.target_calls) < int(ar.target_calls)


@dataclasses.dataclass(frozen=True)
class PositionStub(StubModel):
  """A stand-in target whose prediction depends on the position alone: table[p] is the
  logits of the token after position p, so every row continues one fixed sequence
  (rows are its prefixes) and the lookahead window learns the future exactly."""

  def apply(self, variables, tokens, positions, attention_mask=None, cache=None,
            write_slots=None, logits_at=None):
    del attention_mask, write_slots
    table = variables['params']['table']
    logits = at_positions(table[jnp.clip(positions, 0, table.shape[0] - 1)], logits_at)
    new_cache = None if cache is None else cache.replace(lengths=cache.lengths + tokens.shape[1])
    return ForwardOutput(logits=logits, hidden=jnp.zeros(tokens.shape + (1,)), cache=new_cache)


def _sequence_table(sequence, vocab):
  table = np.full((len(sequence) + 64, vocab), -10.0, np.float32)
  for p, token in enumerate(sequence[1:]):
    table[p, token] = 10.0
  table[len(sequence) - 1:, 3] = 10.0  # past the sequence: token 3 forever
  return {'table': jnp.asarray(table)}


# A repetitive sequence (the pool's n-grams come back) ending in EOS.
SEQUENCE = [1] + [5, 6, 7, 8, 9, 10] * 4 + [5, 6, 7, EOS, 11, 12]
POSITION_STUB = (PositionStub(StubConfig(vocab_size=16, padded_vocab_size=16)),
                 _sequence_table(SEQUENCE, 16))


@pytest.mark.parametrize('kw', [dict(window=3, ngram=4, candidates=2),
                                dict(window=6, ngram=3, candidates=4)], ids=str)
def test_eos_and_the_length_cap_inside_a_block_and_the_capacity_boundary(kw):
  stop = SEQUENCE.index(EOS)
  for prompts, capacity, lengths in (
      # Row 0 stops at EOS, row 1 at max_new_tokens (20 new).
      ([SEQUENCE[:12], SEQUENCE[:2]], 40, [stop + 1, 22]),
      # Both rows stop at the cache capacity (prompt + max_new_tokens would not fit).
      ([SEQUENCE[:5], SEQUENCE[:9]], 24, [24, 24])):
    out = _lookahead(*POSITION_STUB, prompts, 20, capacity, **kw)
    np.testing.assert_array_equal(out.lengths, lengths)
    for row, length in enumerate(lengths):
      np.testing.assert_array_equal(out.tokens[row, :length], SEQUENCE[:length])
    ar = _ar(*POSITION_STUB, prompts, 20, capacity)
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    hist = np.asarray(out.stats['accepted_histogram'])
    assert hist[-1] > 0, 'no full block was accepted'
    assert int(out.target_calls) < int(ar.target_calls)


def test_a_window_past_the_cache_capacity():
  """Window cells sit up to W + N - 3 positions past the root, beyond the capacity near
  the end; greedy output is still plain decoding's, to the last slot."""
  prompts = PROMPTS
  ar = _ar(*TARGET, prompts, 17, 24)
  out = _lookahead(*TARGET, prompts, 17, 24, window=8, ngram=4, candidates=3)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  assert int(out.lengths[2]) == 24  # the longest prompt fills the cache exactly


@pytest.mark.parametrize('sampling,kw', [
    (SamplingConfig(temperature=1.0), dict(window=4, ngram=2, candidates=3)),
    (SamplingConfig(temperature=1.3), dict(window=3, ngram=3, candidates=2)),
    (SamplingConfig(temperature=0.8, top_k=4, top_p=0.9), dict(window=3, ngram=3, candidates=3)),
], ids=['bigram', 'trigram-temperature', 'trigram-topk-topp'])
def test_sampling_is_lossless(sampling, kw, monkeypatch):
  rows, steps, prompt = 20_000, 5, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  config = LookaheadConfig(steps, len(prompt) + steps, sampling=sampling, eos_ids=(), **kw)

  samples, hist = _sampled(config, prompt, rows, 11)
  assert hist[1:].sum() > 1000, 'too few accepted candidates to test the rule'
  assert _g_test(samples, exact) > 1e-3
  if kw['ngram'] == 2:  # The power check runs once (CI time): after a rejected candidate,
    # drawing from p instead of p without it is wrong.
    _wrong_rule_fails(monkeypatch, lambda: _sampled(config, prompt, rows, 11)[0], exact)


class _Recording(LookaheadProposer):
  """Records every proposal (run eagerly, one round at a time)."""

  def __init__(self, *args):
    super().__init__(*args)
    self.proposals = []

  def propose(self, params, state, loop_state, key):
    proposal, state, calls = super().propose(params, state, loop_state, key)
    self.proposals.append(jax.device_get((proposal.tokens, proposal.parents)))
    return proposal, state, calls


def test_the_pool_proposes_only_ngrams_its_window_held():
  """Every candidate path (root, c_1 .. c_{N-1}) was, in an earlier round, a window
  column (its N - 1 cells) followed by the target's prediction after its newest cell
  (computed here from the stub's table, not by the proposer)."""
  vocab, window, ngram, candidates = 12, 4, 4, 3
  stub = StubModel(StubConfig(vocab_size=vocab, padded_vocab_size=16))
  table = random_table(4, vocab, 16)
  successor = np.argmax(np.asarray(table['table'])[:, :vocab], axis=1)
  proposer = _Recording(window, ngram, candidates, vocab)
  config = LookaheadConfig(40, 48, eos_ids=(), window=window, ngram=ngram, candidates=candidates)
  padded, lengths = driver.pad_prompts([[1, 4, 7], [9], [3, 3, 5, 8, 2]])
  prompts, lengths = jnp.asarray(padded), jnp.asarray(lengths)
  cache_size = config.cache_capacity + proposer.cache_slots
  params = driver.Params(target=table)
  state, out = driver.prefill(stub, table, prompts, lengths, config, cache_size,
                              jax.random.PRNGKey(0), proposer.max_depth)
  proposer_state, _ = proposer.start(params, out, prompts, lengths, cache_size)
  state = state.replace(proposer=proposer_state)
  while not bool(jnp.all(state.done)):  # Eagerly, so the proposals can be recorded.
    state = driver.speculative_round(stub, params, proposer, config, cache_size, state)
  seen = [set() for _ in range(3)]
  proposed = 0
  for tokens, parents in proposer.proposals:
    for row in range(3):
      for node in range(1, 1 + proposer.num_verify):
        if parents[row, node] < 0:
          continue
        path, i = [], node
        while i > 0:
          path.insert(0, int(tokens[row, i]))
          i = parents[row, i]
        assert 1 <= node <= proposer.num_verify
        if len(path) == ngram - 1:
          proposed += 1
          assert (int(tokens[row, 0]), *path) in seen[row], (row, path)
      siblings = {}
      for node in range(1, 1 + proposer.num_verify):
        if parents[row, node] >= 0:
          key = (parents[row, node], int(tokens[row, node]))
          assert key not in siblings, 'two siblings carry one token'
          siblings[key] = node
      cells = tokens[row, proposer.node_of]                                  # [N - 1, W]
      for column in cells.T:
        seen[row].add((*map(int, column), int(successor[column[-1]])))
  assert proposed > 0, 'the pool never proposed anything: the test checks nothing'


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  kw = dict(window=4, ngram=4, candidates=3)
  single = _lookahead(*TARGET, prompts, 10, 24, **kw)
  out = generate_on_mesh(*TARGET, prompts, LookaheadConfig(10, 24, eos_ids=(EOS,), **kw))
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_array_equal(out.stats['accepted_histogram'],
                                single.stats['accepted_histogram'])


@pytest.mark.parametrize('kw,message', [
    (dict(window=0), r'lookahead_window must be an integer in \[1, 64\], got 0'),
    (dict(window=65), r'lookahead_window must be an integer in \[1, 64\], got 65'),
    (dict(ngram=1), r'lookahead_ngram must be an integer in \[2, 16\], got 1'),
    (dict(ngram=17), r'lookahead_ngram must be an integer in \[2, 16\], got 17'),
    (dict(candidates=0), r'lookahead_candidates must be an integer in \[1, 64\], got 0'),
    (dict(candidates=2.5), r'lookahead_candidates must be an integer in \[1, 64\], got 2.5'),
])
def test_bad_settings_are_one_line_errors(kw, message):
  with pytest.raises(ValueError, match=message):
    LookaheadConfig(8, 16, **kw)


def test_lookahead_options_belong_to_lookahead():
  method = registry.get('lookahead')
  assert registry.METHODS['lookahead'].lossless(
      method.make_config(generation.DecodeOptions(), 32, (EOS,), None, None))
  with pytest.raises(ValueError, match='--lookahead_ngram is an option of lookahead, not of '
                                       '--method=speculative'):
    registry.check_options(registry.get('speculative'),
                           generation.DecodeOptions(lookahead_ngram=3))
  with pytest.raises(ValueError, match='--num_draft is an option of speculative'):
    registry.check_options(method, generation.DecodeOptions(num_draft=2))


def test_launch_decode_runs_lookahead_and_refuses_bad_settings(trained_tiny):
  texts = ['import os', 'def f(']
  plain = generation.decode_texts(trained_tiny, texts,
                                  options=generation.DecodeOptions(max_new_tokens=16))
  base = [sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
          '--method=lookahead', '--max_new_tokens=16'] + [f'--prompt={t}' for t in texts]
  done = subprocess.run(base + ['--lookahead_window=3', '--lookahead_ngram=3',
                                '--lookahead_candidates=2', '--json'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert [o['tokens'] for o in result['outputs']] == [o['tokens'] for o in plain['outputs']]
  assert len(result['stats']['accepted_histogram']) == 3 and result['stats']['lossless']
  done = subprocess.run(base + ['--lookahead_ngram=1'], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode != 0 and 'Traceback' not in done.stderr
  assert 'lookahead_ngram must be an integer in [2, 16], got 1.' in done.stderr
