"""Parallel block drafting (DFlash) and best-first trees (DDTree): exact greedy equality
(chain and tree, batch 1 and 4, ragged), lossless sampling (G-test with power, including
a drafter that ignores the temperature it was asked for), the heap tree against brute
force, decode-time drafter calls against the training forward, a trained drafter (EOS and
the length cap inside accepted blocks, tau above a random drafter's), 8 devices, errors."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, parallel_drafter, registry, trees, verify
from decoding.sampling import SamplingConfig, log_probs
from launch import generation
from models import ParallelDrafter
from tests.test_speculative import PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint, _g_test
from tests.sharded import generate_on_mesh
from tests.params import init as params_init


def _drafter(model, seed, block_size=5, num_layers=1):
  layers = tuple(range(model.config.num_layers))
  drafter = ParallelDrafter(model.config, num_layers=num_layers, block_size=block_size,
                            target_layers=layers)
  inputs = [jnp.zeros(s.shape, s.dtype) for s in drafter.example_inputs()]
  return drafter, params_init(drafter, seed, *inputs)['params']


def _pd(target, drafter, prompts, max_new, capacity, seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = parallel_drafter.ParallelDraftConfig(max_new, capacity, **{'eos_ids': (2,), **kw})
  return driver.generate(target[0], target[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed), drafter[0], drafter[1])


@pytest.mark.parametrize('tree,batch', [(None, 4), (trees.BestFirstTreeSpec(6, 3), 1)], ids=str)
def test_greedy_equals_plain_greedy(tree, batch):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]  # ragged at batch 4
  ar = _ar(*TARGET, prompts, 17, 30)
  out = _pd(TARGET, _drafter(TARGET[0], 3), prompts, 17, 30, tree=tree)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)
  assert int(out.stats['draft_calls']) == int(out.target_calls)  # one drafter call a round


def test_best_first_tree_is_the_budget_most_probable_prefixes():
  """The heap enumeration against brute force over every prefix of the top_k lists."""
  batch, depth, vocab, budget, k = 3, 3, 5, 10, 3
  scores = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (batch, depth, vocab))
                              * 2, -1)
  tokens, parents, depths = map(np.asarray, trees.best_first_tree(
      trees.BestFirstTreeSpec(budget, k), jnp.arange(batch), scores))
  for b in range(batch):
    top = np.argsort(-np.asarray(scores[b]), -1)[:, :k]
    every = [tuple(top[i, r] for i, r in enumerate(path)) for d in range(1, depth + 1)
             for path in itertools.product(range(k), repeat=d)]
    value = lambda p: sum(float(scores[b, i, t]) for i, t in enumerate(p))
    best = set(sorted(every, key=value, reverse=True)[:budget])
    prefix = {0: ()}
    for i in range(1, budget + 1):
      assert parents[b, i] < i                      # topological order
      prefix[i] = prefix[parents[b, i]] + (tokens[b, i],)
      assert len(prefix[i]) == depths[b, i]
    assert set(prefix.values()) - {()} == best


def _sampled(config_kw, rows, steps, prompt, drafter, seed=11):
  out = _pd(VOCAB6_TARGET, drafter, [prompt] * rows, steps, len(prompt) + steps, seed=seed,
            eos_ids=(), **config_kw)
  return np.asarray(out.tokens[:, len(prompt):]), np.asarray(out.stats['accepted_histogram'])


@pytest.mark.parametrize('tree', [None, trees.BestFirstTreeSpec(5, 2)], ids=str)
def test_sampling_is_lossless(tree, monkeypatch):
  """Chain (independent draws per position, block verification) at T = 0.6 and the tree
  (deterministic candidates, the point-mass rule) at T = 1. Power: the chain's drafter
  drawing at temperature 1 while handing the verifier q at T = 0.6 (the known bug of a
  public implementation), and the tree's rule without the residual, must both fail."""
  sampling = SamplingConfig(temperature=0.6 if tree is None else 1.0)
  rows, steps, prompt = 20_000, 3, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  drafter = _drafter(VOCAB6_TARGET[0], 4, block_size=4)
  kw = dict(sampling=sampling, tree=tree)
  samples, hist = _sampled(kw, rows, steps, prompt, drafter)
  assert hist[0] > 0 and hist[1:].sum() > 0, 'the drafter is neither always right nor wrong'
  assert _g_test(samples, exact) > 1e-3
  jax.clear_caches()
  if tree is None:
    monkeypatch.setattr(parallel_drafter.ParallelDraftProposer, 'propose', _ignores_temperature)
  else:
    monkeypatch.setattr(verify, 'residual_log_probs', lambda p, q, log_weight=None: p)
  try:
    assert _g_test(_sampled(kw, rows, steps, prompt, drafter)[0], exact) < 1e-3
  finally:
    monkeypatch.undo()
    jax.clear_caches()


def _ignores_temperature(self, params, pstate, state, key):
  """The WRONG chain proposer: draws at temperature 1, hands the verifier q at the
  configured temperature."""
  from decoding.proposal import Proposal
  rows, root = jnp.arange(state.tokens.shape[0]), state.lengths - 1
  logits, cache = self._draft(params, pstate, state)
  drawn = jax.random.categorical(key, log_probs(logits, SamplingConfig(temperature=1.0),
                                                self.vocab_size), axis=-1).astype(jnp.int32)
  logp = log_probs(logits, self.config.sampling, self.vocab_size)
  logp = jnp.concatenate([logp, jnp.zeros_like(logp[:, :1])], axis=1)
  return (Proposal.chain(state.tokens[rows, root], drawn, logp), pstate.replace(cache=cache),
          jnp.ones((), jnp.int32))


def test_decode_call_equals_the_training_forward():
  """The proposer's cached call (prompt prefill + one round's pending features) and the
  objective's uncached forward under its training mask give the same block logits."""
  from training.objectives.parallel_drafter import training_mask
  model, params = TARGET
  drafter, dparams = _drafter(model, 5, block_size=4, num_layers=2)
  seq = jnp.asarray([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
  out = model.apply({'params': params}, seq, jnp.arange(10)[None], return_layer_hidden=True)
  feats = jnp.concatenate(out.layer_hidden, axis=-1)
  anchor = 6                                           # the root: x_6, context x_0 .. x_5
  block = model.apply({'params': params}, jnp.full((1, 4), seq[0, anchor]), method=model.embed)
  is_mask = jnp.asarray([[False, True, True, True]])
  mask = training_mask(jnp.ones((1, 10), jnp.int32), jnp.asarray([[anchor]]),
                       jnp.asarray([[True]]), 4)
  positions = jnp.concatenate([jnp.arange(10), anchor + jnp.arange(4)])[None]
  hidden, _ = jax.jit(drafter.apply)({'params': dparams}, feats, block, is_mask, positions, mask)
  offline = model.apply({'params': params}, hidden[:, 1:], method=model.logits)

  config = parallel_drafter.ParallelDraftConfig(4, 20, eos_ids=())
  proposer = parallel_drafter.ParallelDraftProposer(config, model, drafter)
  both = driver.Params(target=params, drafter=dparams)
  prompt_len = 4                                       # prefill x_0 .. x_3; pending x_4, x_5
  prefill = model.apply({'params': params}, seq[:, :prompt_len], jnp.arange(prompt_len)[None],
                        return_layer_hidden=True)
  pstate, _ = jax.jit(proposer.start, static_argnums=4)(
      both, prefill, seq[:, :prompt_len], jnp.asarray([prompt_len]), 24)
  pending = jnp.zeros_like(pstate.features).at[:, :2].set(feats[:, 4:6])
  state = driver.State(tokens=jnp.zeros((1, 20), jnp.int32).at[:, :10].set(seq),
                       lengths=jnp.asarray([anchor + 1]), limits=None, target_cache=None,
                       done=None, rng=None, target_calls=None, draft_calls=None, histogram=None)
  logits, cache = jax.jit(proposer._draft)(both, pstate.replace(features=pending), state)
  np.testing.assert_allclose(logits, offline, atol=2e-5)
  assert int(cache.lengths[0]) == anchor


def test_eight_devices_give_the_tokens_of_one():
  prompts = PROMPTS * 2
  drafter = _drafter(TARGET[0], 3)
  tree, sampling = None, SamplingConfig(temperature=1.0)
  single = _pd(TARGET, drafter, prompts, 10, 24, tree=tree, sampling=sampling)
  out = generate_on_mesh(*TARGET, prompts, parallel_drafter.ParallelDraftConfig(
      10, 24, eos_ids=(2,), tree=tree, sampling=sampling), *drafter)
  np.testing.assert_array_equal(out.tokens, single.tokens)


def test_bad_settings_are_one_line_errors():
  drafter = _drafter(TARGET[0], 3, block_size=5)[0]
  other = _drafter(VOCAB6_TARGET[0], 3)[0]
  settings = dict(max_new_tokens=4, cache_capacity=16, eos_ids=(2,))
  make = lambda **kw: parallel_drafter.make_config(settings, model=TARGET[0], **kw)
  with pytest.raises(ValueError, match=r'trained on another target: vocab_size 6 \(this '
                                       r'target: 60\)'):
    make(block_size=0, tree='', drafter=other)
  with pytest.raises(ValueError, match=r'block_size=6 is out of range: .* blocks of 5 tokens; '
                                       r'give 2 \.\. 5'):
    make(block_size=6, tree='', drafter=drafter)
  with pytest.raises(ValueError, match='block_size=1: give 0'):
    make(block_size=1, tree='', drafter=drafter)
  with pytest.raises(ValueError, match=r'budget must be in \[1, 14\]'):
    make(block_size=4, tree='best:15,2', drafter=drafter)   # 2 + 4 + 8 nodes at most
  with pytest.raises(ValueError, match='best-first trees'):
    make(block_size=0, tree='dynamic:2,2,2', drafter=drafter)
  with pytest.raises(ValueError, match='needs a parallel drafter workdir'):
    registry.get('parallel_draft').drafter(None)
  assert make(block_size=3, tree='best:4', drafter=drafter).drafted(drafter) == 2


@pytest.fixture(scope='module')
def trained_pdraft(trained_tiny, tfds_dir, tmp_path_factory):
  """(eval metrics, restored) a parallel drafter on the trained tiny target."""
  from configs import parallel_drafter as config_lib
  from tests.conftest import _train_briefly
  config = config_lib.get_config('size=tiny')
  config.target_workdir = trained_tiny.workdir
  config.parallel_drafter.num_layers = 1
  config.parallel_drafter.block_size = 6
  config.parallel_drafter.num_anchors = 12
  return _train_briefly(config, tfds_dir, tmp_path_factory, 'pdraft', steps=80)


def test_trained_drafter_beats_a_random_one_and_stops_inside_blocks(trained_tiny,
                                                                   trained_pdraft):
  """On the trained tiny (byte-level) target, batch 4, ragged: greedy tau of the trained
  drafter (chain and best-first tree) beats a random drafter's, outputs equal plain greedy; with a frequent byte as EOS and a length cap of 9, rows end
  inside accepted blocks (chain and tree), still equal to plain greedy."""
  from decoding import autoregressive
  from training import checkpoints
  metrics, trained = trained_pdraft
  assert metrics['head1_agree'] > 0.2, metrics
  tok = trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  options = generation.DecodeOptions(max_new_tokens=40)
  plain, _ = generation.decode_tokens(trained_tiny, prompts, 'autoregressive', options)
  random = _drafter(trained_tiny.model, 9, block_size=6)[1]
  taus = {}
  for name, params, tree in (('trained', trained.params, ''), ('random', random, ''),
                             ('trained', trained.params, 'best:8,3')):
    restored = checkpoints.RestoredModel(trained.config, tok, trained.model, params, 0,
                                         trained.workdir)
    out, stats = generation.decode_tokens(trained_tiny, prompts, 'parallel_draft',
                                          generation.dataclasses.replace(options, tree=tree),
                                          restored)
    assert out == plain, (name, tree)
    taus[name, tree] = stats['mean_accepted']
  assert min(taus['trained', ''], taus['trained', 'best:8,3']) > taus['random', ''] + 0.3, taus

  # EOS = the space byte and a length cap of 9: rows stop inside accepted blocks.
  target = (trained_tiny.model, trained_tiny.params)
  space = tok.encode(' ')[0]
  padded, lengths = driver.pad_prompts(prompts)
  config = autoregressive.AutoregressiveConfig(9, 60, eos_ids=(space,))
  ar = driver.generate(*target, jnp.asarray(padded), jnp.asarray(lengths), config,
                       jax.random.PRNGKey(0))
  ended = [c[-1] == space for c in ar.completions()]
  assert any(ended) and not all(ended), ar.completions()
  for tree in (None, trees.BestFirstTreeSpec(8, 3)):
    out = _pd(target, (trained.model, trained.params), prompts, 9, 60, tree=tree,
              eos_ids=(space,))
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    np.testing.assert_array_equal(out.lengths, ar.lengths)
    hist = np.asarray(out.stats['accepted_histogram'])
    assert hist[1:].sum() > 0, (tree, hist)     # blocks of accepted drafts were cut
