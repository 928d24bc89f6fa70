"""Multi-token prediction: the model (head 1 is a plain LM), the sequential head backward
(same gradient, one head's memory), self-speculative decoding (exact greedy, lossless
sampling), and trained heads beating random ones."""
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
from models import KVCache, Transformer, TransformerConfig
from training import objectives
from tests.test_speculative import PROMPTS, _ar, _exact_joint, _g_test
from tests.params import init as params_init

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mtp_model(seed, heads=3, **kw):
  model = Transformer(TransformerConfig(**{'vocab_size': 60, 'mtp_heads': heads, **kw}))
  z = jnp.zeros((1, 1), jnp.int32)
  return model, params_init(model, seed, z, z)['params']


MTP = _mtp_model(0)


def test_head_one_is_a_plain_lm_and_the_cache_agrees_with_a_full_pass():
  model, params = MTP
  plain = Transformer(TransformerConfig(vocab_size=60))
  plain_params = {k: v for k, v in params.items() if k != 'future'}
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 60)
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  full = model.apply({'params': params}, tokens, positions)
  np.testing.assert_array_equal(full.logits,
                                plain.apply({'params': plain_params}, tokens, positions).logits)
  assert full.future_logits.shape == (2, 9, 2, 128)
  assert KVCache.empty(model.config, 2, 12).k.shape[0] == 2 + 2  # blocks + extra heads
  first = model.apply({'params': params}, tokens[:, :5], positions[:, :5],
                      cache=KVCache.empty(model.config, 2, 12))
  rest = model.apply({'params': params}, tokens[:, 5:], positions[:, 5:], cache=first.cache)
  np.testing.assert_allclose(rest.future_logits, full.future_logits[:, 5:], atol=1e-5)


def _batch(vocab, batch=4, length=48):
  inputs = jax.random.randint(jax.random.PRNGKey(2), (batch, length), 0, vocab)
  return dict(inputs=inputs, targets=jnp.roll(inputs, -1, axis=1),
              positions=jnp.broadcast_to(jnp.arange(length), (batch, length)),
              segment_ids=jnp.where(jnp.arange(length) < 30, 1, 2)[None].repeat(batch, 0),
              loss_mask=jnp.ones((batch, length), jnp.int32),
              target_bytes=jnp.ones((batch, length), jnp.int32))


def test_sequential_head_backward_is_the_plain_gradient_with_one_heads_memory():
  temp = {}
  for heads in (2, 6):
    objective = objectives.MultiTokenObjective(
        TransformerConfig(vocab_size=2000, mtp_heads=heads))
    batch = _batch(2000, length=32)
    params = params_init(objective, 0, batch)
    key = jax.random.PRNGKey(0)
    # One compilation each: the compiled program is both run and measured.
    plain = jax.jit(
        lambda p: jax.value_and_grad(objective.loss, has_aux=True)(p, batch, key, 0)
    ).lower(params).compile()
    sequential = jax.jit(lambda p: objective.loss_and_grad(p, batch, key, 0)).lower(
        params).compile()
    (loss_a, sums_a), grads_a = plain(params)
    (loss_b, sums_b), grads_b = sequential(params)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 (sums_a, grads_a), (sums_b, grads_b))
    assert set(objectives.summarize(sums_b)) >= {f'head{i}_nll' for i in range(2, heads + 1)}
    temp[heads] = [f.memory_analysis().temp_size_in_bytes for f in (plain, sequential)]
  # Plain backward keeps every head's logits; the sequential one, one head's.
  assert temp[6][0] > 2 * temp[2][0], temp
  assert temp[6][1] < 1.2 * temp[2][1], temp


def _self_spec(target, prompts, max_new, capacity, tree, seed=0, **kw):
  padded, lengths = driver.pad_prompts(prompts)
  config = medusa.MedusaConfig(max_new, capacity, tree=tree, **{'eos_ids': (2,), **kw})
  return driver.generate(target[0], target[1], jnp.asarray(padded), jnp.asarray(lengths), config,
                         jax.random.PRNGKey(seed))


@pytest.mark.parametrize('tree,batch', [(trees.TreeSpec((1, 1)), 4),
                                        (trees.TreeSpec((3, 2)), 1)], ids=str)
def test_self_speculation_greedy_equals_plain_greedy(tree, batch):
  prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[2]]  # ragged at batch 4
  ar = _ar(*MTP, prompts, 17, 30)
  out = _self_spec(MTP, prompts, 17, 30, tree)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.lengths, ar.lengths)


def test_self_speculative_sampling_is_lossless():
  rows, steps, prompt = 20_000, 3, [1, 3]
  sampling = SamplingConfig(temperature=1.0)
  model = _mtp_model(5, heads=3, vocab_size=6)
  exact = _exact_joint(*model, prompt, steps, sampling, 6)
  out = _self_spec(model, [prompt] * rows, steps, len(prompt) + steps, trees.TreeSpec((2, 2)),
                   seed=3, sampling=sampling, eos_ids=())
  hist = np.asarray(out.stats['accepted_histogram'])
  assert hist[0] > 0 and hist[1:].sum() > 0
  assert _g_test(np.asarray(out.tokens[:, len(prompt):]), exact) > 1e-3


def test_trained_mtp_heads_beat_random_heads(trained_mtp):
  """configs/mtp.py trained from scratch (tiny, 3 heads, 150 steps): self-speculative
  tau beats the same model with its extra heads re-initialised at random, outputs equal
  to the model's own greedy decoding, for a tree and a chain; then the command line."""
  from training import checkpoints
  metrics, trained = trained_mtp
  workdir = trained.workdir
  assert metrics['head2_top1'] > 0.1, metrics
  assert trained.model.config.mtp_heads == 3

  tok = trained.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ', '# Copyright')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  options = generation.DecodeOptions(max_new_tokens=40, tree='3,2')
  plain, _ = generation.decode_tokens(
      trained, prompts, 'autoregressive',
      registry.options_for(registry.get('autoregressive'), options))
  fresh = params_init(trained.model, 7, jnp.zeros((1, 1), jnp.int32),
                                           jnp.zeros((1, 1), jnp.int32))['params']
  randomized = dict(trained.params, **{k: v for k, v in fresh.items() if k == 'future'})
  taus = {}
  for name, params in (('trained', trained.params), ('random', randomized)):
    restored = checkpoints.RestoredModel(trained.config, tok, trained.model, params, 0, workdir)
    out, stats = generation.decode_tokens(restored, prompts, 'mtp', options)
    assert out == plain, name
    taus[name] = stats['mean_accepted']
  assert taus['trained'] > taus['random'] + 0.3, taus

  chain, stats = generation.decode_tokens(
      trained, prompts, 'mtp', generation.DecodeOptions(max_new_tokens=40, tree='1,1'))
  assert chain == plain and 1.0 < stats['mean_accepted'] <= taus['trained']

  # The command lines: tune the MTP model's tree, then decode with it (the default).
  done = subprocess.run(
      [sys.executable, '-m', 'launch.tune_tree', f'--workdir={workdir}', '--budget=8',
       '--num_prompts=4'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  with open(os.path.join(workdir, 'heads_tree.txt')) as f:
    tuned = trees.parse(f.read().strip())
  assert tuned.num_nodes == 9 and tuned.depth <= 2
  done = subprocess.run(
      [sys.executable, '-m', 'launch.decode', f'--workdir={workdir}', '--method=mtp',
       '--prompt=import os\nimport sys\n', '--max_new_tokens=40', '--json'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert result['outputs'][0]['tokens'] == plain[0]
  assert result['stats']['mean_accepted'] > 1.0
