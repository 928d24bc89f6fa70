"""EAGLE: exact greedy equality, lossless sampling (G-test with power), the drafter's
feature plumbing checked against an offline teacher-forced run, and a trained drafter
beating a random one."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, eagle, trees, verify
from decoding.sampling import SamplingConfig
from launch import generation
from models import EagleDrafter
from tests.test_speculative import PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint, _g_test
from tests.params import init as params_init

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _drafter(model, seed):
  drafter = EagleDrafter(model.config)
  inputs = [jnp.zeros(s.shape, s.dtype) for s in drafter.example_inputs()]
  return drafter, params_init(drafter, seed, *inputs)['params']


def _eagle(target, drafter, prompts, max_new, capacity, tree, seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = eagle.EagleConfig(max_new, capacity, tree=tree, **{'eos_ids': (2,), **kw})
  return driver.generate(target[0], target[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed), drafter[0], drafter[1])


@pytest.mark.parametrize('tree,batch', [(trees.DynamicTreeSpec(3, 4, 10), 4),
                                        (trees.DynamicTreeSpec(2, 3, 6), 1)], ids=str)
def test_greedy_equals_plain_greedy(tree, batch):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]  # ragged at batch 4
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _eagle(TARGET, _drafter(TARGET[0], 3), prompts, 17, 30, tree)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)


def test_sampling_is_lossless(monkeypatch):
  """Children drawn without replacement (RRSw, the default under sampling). (With
  top-k/top-p filters the rule is tested in test_speculative.py's dynamic-rrsw-topk-topp
  case; EAGLE shares it, grow_dynamic_tree and draft_scores.)"""
  sampling, tree = SamplingConfig(temperature=1.0), trees.DynamicTreeSpec(2, 3, 6)
  rows, steps, prompt = 20_000, 3, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  drafter = _drafter(VOCAB6_TARGET[0], 4)

  def sample():
    out = _eagle(VOCAB6_TARGET, drafter, [prompt] * rows, steps, len(prompt) + steps, tree,
                 seed=11, sampling=sampling, eos_ids=())
    return np.asarray(out.tokens[:, len(prompt):]), np.asarray(out.stats['accepted_histogram'])

  samples, hist = sample()
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the drafter is neither always right nor wrong'
  assert _g_test(samples, exact) > 1e-3
  # Power: not taking the residual after a rejected sibling must fail the same test.
  jax.clear_caches()
  monkeypatch.setattr(verify, 'residual_log_probs', lambda p, q, log_weight=None: p)
  assert _g_test(sample()[0], exact) < 1e-3
  jax.clear_caches()


def _offline_depth1_acceptances(target, drafter, prompt, completion):
  """Greedy rounds of a depth-1, top-1 EAGLE tree, replayed without caches: the drafter
  run teacher-forced on the target's features of the final sequence. Returns the number
  of accepted drafts."""
  model, params = target
  seq = jnp.asarray([prompt + completion])
  positions = jnp.arange(seq.shape[1])[None]
  features = model.apply({'params': params}, seq, positions).hidden
  embedded = model.apply({'params': params}, jnp.roll(seq, -1, axis=1), method=model.embed)
  predicted, _ = drafter[0].apply({'params': drafter[1]}, features, embedded, positions)
  guess = np.asarray(jnp.argmax(model.apply({'params': params}, predicted,
                                            method=model.logits)[0, :, :model.config.vocab_size],
                                -1))
  tokens, n, accepted = list(prompt + completion), len(prompt) + 1, 0
  while n < len(tokens):
    # The root x_{n-1}'s entry (f_{n-2}, x_{n-1}) predicts f_{n-1} -> a guess for x_n.
    if guess[n - 2] == tokens[n]:
      accepted += 1
      n += 2
    else:
      n += 1
  return accepted


def test_trained_drafter_reads_the_right_features_and_beats_a_random_one(trained_tiny,
                                                                        trained_eagle):
  """EAGLE on the trained tiny target, 150 steps. (1) With a depth-1 tree, the rounds
  that accept are exactly those an offline, teacher-forced run of the drafter predicts
  (the catch-up feeds the right features at the right slots). (2) With an EAGLE-2
  tree, greedy tau beats a random drafter's, outputs equal to plain greedy. (3) The
  command line decodes with it."""
  from training import checkpoints
  metrics, trained = trained_eagle
  workdir = trained.workdir
  assert metrics['head1_agree'] > 0.2, metrics
  assert isinstance(trained.model, EagleDrafter)

  tok = trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  target = (trained_tiny.model, trained_tiny.params)
  drafter = (trained.model, trained.params)
  plain, _ = generation.decode_tokens(trained_tiny, prompts, 'autoregressive',
                                      generation.DecodeOptions(max_new_tokens=40))
  out = _eagle(target, drafter, prompts, 40, 80, trees.DynamicTreeSpec(1, 1, 1))
  assert out.completions() == plain
  offline = sum(_offline_depth1_acceptances(target, drafter, p, c) for p, c in zip(prompts, plain))
  hist = np.asarray(out.stats['accepted_histogram'])
  assert hist[1] == offline and offline > 10, (hist, offline)

  options = generation.DecodeOptions(max_new_tokens=40, tree='dynamic:3,4,10')
  taus = {}
  random = _drafter(trained_tiny.model, seed=9)[1]
  for name, params in (('trained', trained.params), ('random', random)):
    restored = checkpoints.RestoredModel(trained.config, tok, trained.model, params, 0, workdir)
    out, stats = generation.decode_tokens(trained_tiny, prompts, 'eagle', options, restored)
    assert out == plain, name
    taus[name] = stats['mean_accepted']
  assert taus['trained'] > taus['random'] + 0.5, taus

  done = subprocess.run(
      [sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
       '--method=eagle', f'--heads_workdir={workdir}', '--tree=dynamic:3,4,10',
       '--prompt=import os\nimport sys\n', '--max_new_tokens=40', '--json'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert result['outputs'][0]['tokens'] == plain[0]
  assert result['stats']['mean_accepted'] > 1.0


def test_accepted_ranks_price_every_smaller_budget(trained_tiny, trained_eagle):
  """What --tree=auto rests on (launch/autotune.py): under greedy, the tree of budget b
  accepts, in the same round, exactly the nodes of rank < b that a larger tree of the
  same expansion accepted. One round per row (2 new tokens: the prefill's and one
  round's), 8 prompts: the largest tree's accepted-rank counts predict every smaller
  budget's accepted total exactly."""
  tok = trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright',
           'for i in range(', 'return self.', 'if __name__ == ', 'x = np.')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  target = (trained_tiny.model, trained_tiny.params)
  drafter = (trained_eagle[1].model, trained_eagle[1].params)
  big = _eagle(target, drafter, prompts, 2, 40, trees.DynamicTreeSpec(3, 4, 24))
  by_rank = np.asarray(big.stats['accepted_rank_histogram'])
  big_hist = np.asarray(big.stats['accepted_histogram'])
  assert by_rank.shape == (24,) and by_rank.sum() == (big_hist * np.arange(len(big_hist))).sum()
  assert by_rank.sum() > 4, 'the trained drafter accepts something'
  for budget in (1, 2, 3, 5, 8, 13):
    out = _eagle(target, drafter, prompts, 2, 40, trees.DynamicTreeSpec(3, 4, budget))
    hist = np.asarray(out.stats['accepted_histogram'])
    assert hist.sum() == big_hist.sum()                           # the same row-rounds
    assert (hist * np.arange(len(hist))).sum() == by_rank[:budget].sum(), budget
