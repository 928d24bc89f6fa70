"""Prompt lookup decoding (decoding/lookup.py): the n-gram search on hand-built buffers,
the match tree, the verifier honouring num_drafted, exact greedy equality with plain
decoding (batch 1 and 4, ragged, EOS in a block, the length cap and the capacity inside
a block, no match at all), lossless sampling (G-test with power), 8 devices, options."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from decoding import driver, lookup, registry, verify
from decoding.proposal import Proposal
from decoding.sampling import SamplingConfig
from launch import generation
from tests.test_proposer import REPO
from tests.sharded import generate_on_mesh
from tests.test_speculative import (EOS, STUB, TABLE, TARGET, VOCAB6_TARGET, _ar, _exact_joint,
                                    _g_test, _sampled, _wrong_rule_fails)


def _lookup(model, params, prompts, max_new, capacity, sampling=SamplingConfig(), seed=0,
            **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = lookup.LookupConfig(max_new, capacity, sampling, (EOS,), **kw)
  return driver.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


def _buffer(rows, size=16):
  padded, lengths = driver.pad_prompts(rows)
  return driver.token_buffer(jnp.asarray(padded), jnp.asarray(lengths), size), jnp.asarray(lengths)


def test_lookup_on_hand_built_buffers_drafts_the_right_continuation():
  tokens, lengths = _buffer([
      [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3],   # two 3-gram matches: the most recent, then the other
      [4, 4, 4, 4],                         # a run: the overlapping match continues its period
      [5, 6, 5, 6, 5],                      # period 2
      [1, 2, 3],                            # no match at all
      [1, 2, 9, 2]])                        # only a 1-gram match
  count = lookup.match_lengths(tokens, lengths, 3)
  np.testing.assert_array_equal(count[0, :10], [0, 0, 3, 0, 0, 0, 3, 0, 0, 0])
  drafts, found = lookup.find_drafts(tokens, lengths, 4, 3, 1, num_matches=2)
  np.testing.assert_array_equal(found, [[1, 1], [1, 1], [1, 1], [0, 0], [1, 0]])
  np.testing.assert_array_equal(drafts[:, 0], [[7, 1, 2, 3], [4, 4, 4, 4], [6, 5, 6, 5],
                                               [0, 0, 0, 0], [9, 2, 9, 2]])
  np.testing.assert_array_equal(drafts[0, 1], [9, 1, 2, 3])
  _, found = lookup.find_drafts(tokens, lengths, 4, 3, 2)   # min_ngram 2: the 1-gram is out
  np.testing.assert_array_equal(found[:, 0], [1, 1, 1, 0, 0])


def test_match_tree_merges_shared_prefixes_and_respects_the_room():
  drafts = jnp.asarray([[[1, 2, 3], [1, 2, 4], [5, 6, 7]]] * 2)
  found = jnp.asarray([[True, True, True], [True, True, False]])
  tokens, parents = lookup.match_tree(drafts, found, jnp.asarray([3, 2]))
  np.testing.assert_array_equal(tokens[0], [1, 1, 5, 2, 2, 6, 3, 4, 7])
  np.testing.assert_array_equal(parents, [[-1, 0, -2, 0, 1, -2, 3, 4, 4, 6],
                                          [-1, 0, -2, -2, 1, -2, -2, -2, -2, -2]])


def test_verify_honours_num_drafted_for_deterministic_chains():
  """A deterministic chain (point-mass rule, tree_accept) stops at num_drafted even where
  the target would accept the tokens past it."""
  v = 8
  point = lambda ids: jnp.where(jax.nn.one_hot(jnp.asarray(ids), v) > 0, 0.0, -jnp.inf)
  drafted = jnp.asarray([[3, 4, 5]] * 4)
  target = point([[3, 4, 5, 7], [3, 4, 5, 7], [3, 4, 5, 7], [3, 1, 5, 7]])
  proposal = Proposal.chain(jnp.zeros(4, jnp.int32), drafted, None, jnp.asarray([3, 1, 0, 3]))
  path, n, nxt = verify.accept(jax.random.PRNGKey(0), proposal, target, greedy=True)
  np.testing.assert_array_equal(n, [3, 1, 0, 1])
  np.testing.assert_array_equal(nxt, [7, 4, 3, 1])
  np.testing.assert_array_equal(path, [[0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
  # Sampling: a row with nothing drafted draws its next token from p at the root.
  p = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(1), (v,)))
  rows = 20_000
  proposal = Proposal.chain(jnp.zeros(rows, jnp.int32), jnp.full((rows, 2), 3, jnp.int32), None,
                            jnp.zeros(rows, jnp.int32))
  _, n, nxt = verify.accept(jax.random.PRNGKey(2), proposal,
                            jnp.broadcast_to(p, (rows, 3, v)), greedy=False)
  assert int(jnp.max(n)) == 0
  counts = np.bincount(np.asarray(nxt), minlength=v)
  assert scipy.stats.chisquare(counts, np.exp(np.asarray(p, np.float64)) * rows).pvalue > 1e-3


REPEATING = [[1, 5, 6, 7, 1, 5, 6], [1, 7], [1, 8, 9, 10, 8, 9, 10, 8], [1, 20, 21, 20]]


@pytest.mark.parametrize('batch,kw', [(1, dict(num_draft=3)), (4, dict(num_draft=5)),
                                      (4, dict(num_draft=3, branches=3, max_ngram=2))],
                         ids=['b1', 'b4', 'b4-tree'])
def test_greedy_equals_plain_greedy(batch, kw):
  prompts = REPEATING[:batch] if batch > 1 else [REPEATING[2]]
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _lookup(*TARGET, prompts, 17, 30, **kw)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  hist = np.asarray(out.stats['accepted_histogram'])
  assert len(hist) == kw['num_draft'] + 1 and hist[1:].sum() > 0  # some drafts were kept


def test_eos_length_cap_capacity_and_no_match_on_a_successor_table():
  """After t comes t + 1 up to 11, then EOS: a prompt that already holds the answer
  is copied in one round; EOS, max_new_tokens and the buffer each cut inside it."""
  stub = (STUB, TABLE)
  prompts = [[9, 10, 11, 2, 5, 9],          # EOS inside the accepted block
             [5, 6, 7, 8, 9, 10, 5],         # the length cap (4 new tokens) inside the block
             [3]]                            # 4 5 6 ...: no token ever repeats, no match
  ar = _ar(*stub, prompts, 4, 12)
  out = _lookup(*stub, prompts, 4, 12, num_draft=5)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, [9, 11, 5])
  np.testing.assert_array_equal(out.tokens[0, 6:10], [10, 11, 2, 0])
  # Rows 0 and 1 finish in one round; row 2 (no match) takes a round per token.
  assert int(out.target_calls) == int(ar.target_calls) == 4
  # The buffer (capacity 9) ends inside the 5-token block (the target call is wider than
  # the room left): 2 are drafted, 2 kept, plus the target's token.
  ar = _ar(*stub, [[5, 6, 7, 8, 5]], 6, 9)
  out = _lookup(*stub, [[5, 6, 7, 8, 5]], 6, 9, num_draft=5)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.tokens[0], [5, 6, 7, 8, 5, 6, 7, 8, 9])
  assert int(out.target_calls) == 2
  # No match at all: nothing is ever drafted, every round is a plain step.
  out = _lookup(*stub, [[3]], 8, 12, num_draft=4)
  assert np.asarray(out.stats['accepted_histogram'])[1:].sum() == 0
  np.testing.assert_array_equal(out.tokens, _ar(*stub, [[3]], 8, 12).tokens)


@pytest.mark.parametrize('sampling,kw,power', [
    (SamplingConfig(temperature=1.0), dict(num_draft=2), True),
    (SamplingConfig(temperature=0.8, top_k=4, top_p=0.9), dict(num_draft=2, branches=3), False),
], ids=['chain', 'tree-topk-topp'])
def test_lookup_sampling_is_lossless(sampling, kw, power, monkeypatch):
  rows, steps, prompt = 20_000, 3, [1, 3, 4, 1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  config = lookup.LookupConfig(steps, len(prompt) + steps, sampling=sampling, eos_ids=(), **kw)

  samples, hist = _sampled(config, prompt, rows, 11)
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the lookup is neither always right nor wrong'
  assert _g_test(samples, exact) > 1e-3
  if power:  # A wrong rule (p not renormalised after a rejected candidate) must fail.
    _wrong_rule_fails(monkeypatch, lambda: _sampled(config, prompt, rows, 11)[0], exact)


@pytest.mark.parametrize('kw', [dict(num_draft=3), dict(num_draft=3, branches=2)], ids=str)
def test_eight_devices_give_the_tokens_of_one(kw):
  prompts = REPEATING * 2
  single = _lookup(*TARGET, prompts, 10, 24, **kw)
  out = generate_on_mesh(*TARGET, prompts, lookup.LookupConfig(10, 24, eos_ids=(EOS,), **kw))
  np.testing.assert_array_equal(out.tokens, single.tokens)


def test_trained_model_through_the_registry_equals_autoregressive(trained_tiny):
  texts = ['import os\nimport os\nimport ', 'def f(x):\n    return x\ndef g(', '    return ',
           'self.x = x\n        self.']
  options = generation.DecodeOptions(max_new_tokens=24)
  plain = generation.decode_texts(trained_tiny, texts, options=options)
  for kw in (dict(num_draft=4), dict(num_draft=3, lookup_branches=3, lookup_max_ngram=4)):
    got = generation.decode_texts(trained_tiny, texts, 'lookup',
                                  generation.DecodeOptions(max_new_tokens=24, **kw))
    assert [o['tokens'] for o in got['outputs']] == [o['tokens'] for o in plain['outputs']]
    assert got['stats']['lossless'] and got['stats']['mean_accepted'] > 1.0


def test_bad_options_are_one_line_errors(trained_tiny):
  with pytest.raises(ValueError, match='lookup n-gram sizes must satisfy'):
    lookup.LookupConfig(4, 8, max_ngram=0)
  with pytest.raises(ValueError, match='lookup n-gram sizes must satisfy'):
    lookup.LookupConfig(4, 8, max_ngram=2, min_ngram=3)
  with pytest.raises(ValueError, match=r'lookup_branches must be in \[1, 16\]'):
    lookup.LookupConfig(4, 8, branches=0)
  with pytest.raises(ValueError, match='num_draft must be >= 1'):
    lookup.LookupConfig(4, 8, num_draft=0)
  for method, options, message in (
      ('lookup', dict(jacobi_window=8), '--jacobi_window is an option of jacobi, not of '
                                        '--method=lookup'),
      ('speculative', dict(lookup_max_ngram=5), '--lookup_max_ngram is an option of lookup, '
                                                'not of --method=speculative')):
    with pytest.raises(ValueError, match=message):
      registry.check_options(registry.get(method), generation.DecodeOptions(**options))
  done = subprocess.run([sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
                         '--prompt=x', '--method=lookup', '--lookup_min_ngram=4'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and 'Traceback' not in done.stderr
  assert 'lookup n-gram sizes must satisfy 1 <= lookup_min_ngram <= lookup_max_ngram' in done.stderr
