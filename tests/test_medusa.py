"""Medusa heads: exact greedy equality, lossless sampling vs LOSSY typical acceptance
(the same G-test passes one and fails the other), and trained heads beat untrained ones."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, medusa, registry, trees
from decoding.sampling import SamplingConfig
from launch import generation
from models import MedusaHeads
from tests.test_speculative import PROMPTS, TARGET, VOCAB6_TARGET, _ar, _exact_joint, _g_test

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _heads(model, num_heads, seed, scale=0.3):
  """Random heads: the initial zero blocks perturbed so each head guesses differently."""
  heads = MedusaHeads(model.config, num_heads)
  params = heads.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, model.config.d_model)))
  params = jax.tree.map(lambda x: x + scale * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                                x.shape), params['params'])
  return heads, params


def _medusa(target, heads, prompts, max_new, capacity, seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = medusa.MedusaConfig(max_new, capacity, **{'eos_ids': (2,), **kw})
  return driver.generate(target[0], target[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed), heads[0], heads[1])


@pytest.mark.parametrize('tree,batch', [(trees.TreeSpec((2, 2)), 4),
                                        (trees.TreeSpec((3, 2, 1)), 1),
                                        (trees.parse('paths:0;1;2;0.0;0.1;1.0;0.0.0'), 4)],
                         ids=str)
def test_greedy_equals_plain_greedy(tree, batch):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]
  ar = _ar(*TARGET, prompts, 17, 30)
  # Typical acceptance is greedy too at temperature 0 (checked on one tree).
  for typical in (False, True) if batch == 1 else (False,):
    out = _medusa(TARGET, _heads(TARGET[0], 3, seed=2), prompts, 17, 30, tree=tree,
                  typical=typical)
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    np.testing.assert_array_equal(out.lengths, ar.lengths)


def test_sparse_trees_and_greedy_tree_growth():
  tree = trees.parse('paths:1;0;0.1;0.0;0.0.0')
  assert str(tree) == 'paths:0;1;0.0;0.1;0.0.0'   # nodes by depth, then path
  np.testing.assert_array_equal(tree.parents, [-1, 0, 0, 1, 1, 3])
  np.testing.assert_array_equal(tree.ranks, [0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(tree.depths, [0, 1, 1, 2, 2, 3])
  assert tree.max_children == 2
  for bad in ('paths:0.1', 'paths:0;0', 'paths:-1'):
    with pytest.raises(ValueError):
      trees.parse(bad)
  # Candidates: node i takes head (depth - 1)'s rank-r token.
  head_logits = jnp.asarray([[[0., 5., 4., 1.], [3., 0., 1., 2.], [1., 2., 3., 0.]]])
  np.testing.assert_array_equal(trees.from_ranked(tree, jax.lax.top_k(head_logits, 3)[1], jnp.asarray([9])),
                                [[9, 1, 2, 0, 3, 2]])
  # Tuning: a path's chance is how often it is a prefix of the heads' ranks of the
  # target's greedy tokens (-1: not in the top list); greedy growth by chance.
  chances = trees.path_chances(np.asarray([[0, 0, -1], [0, 1, 0], [1, -1, 0], [-1, 0, 0]]))
  assert chances == {(0,): .5, (0, 0): .25, (0, 1): .25, (0, 1, 0): .25, (1,): .25}
  grown, tau = trees.grow_tree({(0,): .5, (1,): .2, (0, 0): .3, (0, 1): .05}, budget=3)
  assert str(grown) == 'paths:0;1;0.0' and tau == pytest.approx(1 + .5 + .3 + .2)


@pytest.mark.parametrize('tree,sampling,tree_rule', [
    (trees.TreeSpec((2, 2)), SamplingConfig(temperature=1.0), 'rrsw'),
    (trees.TreeSpec((2, 2)), SamplingConfig(temperature=1.0), 'specinfer'),
    (trees.parse('paths:0;2;0.1'), SamplingConfig(temperature=0.8, top_k=4, top_p=0.9), 'rrsw'),
], ids=['rrsw', 'specinfer', 'rrsw-sparse-topk-topp'])
def test_exact_rule_is_lossless_and_typical_acceptance_is_not(tree, sampling, tree_rule,
                                                              monkeypatch):
  """The exact rules: candidates drawn without replacement from each head (RRSw, the
  default) and the heads' top-k (SpecInfer's point-mass rule). The sparse tree skips
  rank 1 at both depths: a drawn candidate outside the tree may still be accepted."""
  rows, steps, prompt = 20_000, 3, [1, 3]
  exact = _exact_joint(*VOCAB6_TARGET, prompt, steps, sampling, 6)
  heads = _heads(VOCAB6_TARGET[0], 2, seed=7, scale=1.0)
  prompts = [prompt] * rows

  def sample(typical):
    out = _medusa(VOCAB6_TARGET, heads, prompts, steps, len(prompt) + steps, seed=3,
                  tree=tree, sampling=sampling, typical=typical, eos_ids=(),
                  tree_rule=tree_rule)
    return np.asarray(out.tokens[:, len(prompt):]), np.asarray(out.stats['accepted_histogram'])

  samples, hist = sample(False)
  assert hist[1:].sum() > 0 and hist[0] > 0
  assert _g_test(samples, exact) > 1e-3
  if tree_rule == 'rrsw' and not sampling.top_k:
    # Power: not taking the residual after a rejected candidate must fail.
    from tests.test_speculative import _wrong_rule_fails
    _wrong_rule_fails(monkeypatch, lambda: sample(False)[0], exact)
  if tree_rule == 'specinfer':  # Typical acceptance (on the top-k) is LOSSY, and the
    samples, hist = sample(True)  # test can tell.
    assert hist[1:].sum() > 0
    assert _g_test(samples, exact) < 1e-3


def test_trained_heads_beat_untrained_heads(trained_tiny, trained_medusa):
  """Medusa-1 on the trained tiny target: 150 steps; greedy tau on validation-like
  prompts beats both random heads and the untrained initialisation (every head a copy
  of the LM head). Then a tree tuned on validation data, and the command line."""
  from training import checkpoints
  metrics, trained = trained_medusa
  workdir = trained.workdir
  assert metrics['head1_top1'] > 0.1
  assert set(trained.params) == {'heads'}

  tok = trained_tiny.tokenizer
  texts = ['import os\nimport sys\n', 'def __init__(self', 'class Foo(object):\n    ',
           '    return self.', 'for i in range(', '        if not ']
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  options = generation.DecodeOptions(max_new_tokens=48, tree='3,2,2')
  plain, _ = generation.decode_tokens(
      trained_tiny, prompts, 'autoregressive',
      registry.options_for(registry.get('autoregressive'), options))
  taus = {}
  untrained = jax.tree.map(lambda x: x, trained.params)
  untrained['heads'] = {**untrained['heads'], 'block': 0 * untrained['heads']['block'],
                        'block_bias': 0 * untrained['heads']['block_bias'],
                        'lm_head': jnp.broadcast_to(trained_tiny.params['lm_head'],
                                                    untrained['heads']['lm_head'].shape)}
  random = {'heads': _heads(trained_tiny.model, 3, seed=5)[1]}
  for name, params in (('trained', trained.params), ('untrained', untrained),
                       ('random', random)):
    heads = checkpoints.RestoredModel(trained.config, tok, trained.model, params, 0, workdir)
    out, stats = generation.decode_tokens(trained_tiny, prompts, 'medusa', options, heads)
    assert out == plain, name
    taus[name] = stats['mean_accepted']
  assert taus['trained'] > taus['untrained'] + 0.1 and taus['trained'] > taus['random'] + 0.2, taus

  # A tree tuned on validation data (launch.tune_tree) is what decoding then uses.
  from launch import tree_tuning
  tuned = tree_tuning.tune(trained_tiny, trained, budget=12, num_prompts=4).tree
  assert tuned.num_nodes == 13
  with open(tree_tuning.tuned_tree_path(workdir), 'w') as f:  # what launch.tune_tree writes
    f.write(str(tuned))
  out, stats = generation.decode_tokens(trained_tiny, prompts, 'medusa',
                                        generation.DecodeOptions(max_new_tokens=48), trained)
  assert out == plain and stats['tree'] == str(tuned) and stats['mean_accepted'] > 1.2

  done = subprocess.run(
      [sys.executable, '-m', 'launch.decode', f'--workdir={trained_tiny.workdir}',
       '--method=medusa', f'--heads_workdir={workdir}', '--tree=3,2,2',
       '--prompt=import os\nimport sys\n', '--max_new_tokens=48', '--json'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert result['outputs'][0]['tokens'] == plain[0]
  assert result['stats']['mean_accepted'] > 1.0


def test_medusa2_trains_the_target_with_its_heads(trained_tiny, tfds_dir, tmp_path):
  """joint=true: parameters {'base', 'heads'}, the base starting from the target."""
  from configs import medusa as medusa_config
  from training import checkpoints, trainer
  config = medusa_config.get_config('size=tiny,num_heads=2,joint=true')
  config.target_workdir = trained_tiny.workdir
  config.data.data_dir = tfds_dir
  config.num_train_steps = 2
  config.seq_len = 32
  config.eval_every_steps = config.checkpoint_every_steps = 2
  config.eval_batches = 1
  trainer.train(config, str(tmp_path / 'joint'), progress=False)
  joint = checkpoints.restore_model(str(tmp_path / 'joint'))
  assert set(joint.params) == {'base', 'heads'}
  change = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      joint.params['base'], trained_tiny.params))
  assert 0 < max(change) <= 2.5 * config.learning_rate * 2   # started from the target
  prompts = [[1, *trained_tiny.tokenizer.encode('import os\n')]]
  options = generation.DecodeOptions(max_new_tokens=16, tree='2,2')
  out, _ = generation.decode_tokens(trained_tiny, prompts, 'medusa', options, joint)
  tuned = checkpoints.RestoredModel(trained_tiny.config, trained_tiny.tokenizer,
                                    trained_tiny.model, joint.params['base'], 2, '')
  plain, _ = generation.decode_tokens(
      tuned, prompts, 'autoregressive',
      registry.options_for(registry.get('autoregressive'), options))
  assert out == plain   # Medusa-2 decodes its own jointly trained base, exactly.
