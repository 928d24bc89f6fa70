"""Faults found on real inputs (issue 15), each turned into its right value: the stop set
is every EOS id a checkpoint declares, draft / target vocabularies of different padded
sizes, extreme temperatures, completion text, finish reasons. Small random models; the
SmolLM2 case of the stop ids lives in test_gguf.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import driver, sampling, speculative, trees
from decoding.sampling import SamplingConfig
from decoding.speculative import SpeculativeConfig
from models import Transformer, TransformerConfig
from tests.test_medusa import _heads, _medusa
from tests.test_speculative import DRAFT, PROMPTS, TARGET, _ar, _spec
from tests.params import init as params_init

# Every draft-model shape (chain, static tree, dynamic tree) and Medusa's tree.
SPEC_SHAPES = {'chain': dict(num_draft=3), 'static-tree': dict(tree=trees.TreeSpec((2, 2))),
               'dynamic-tree': dict(tree=trees.parse('dynamic:3,3,6'))}


def _every_method(prompts, max_new, capacity, eos_ids, sampling_config=SamplingConfig()):
  """{method: Output} for AR, the draft model's three shapes, Medusa, and the methods
  that need no drafter (prompt lookup, Jacobi, lookahead)."""
  outs = {'autoregressive': _ar_eos(prompts, max_new, capacity, eos_ids, sampling_config)}
  padded, lengths = driver.pad_prompts(prompts)
  for name, shape in SPEC_SHAPES.items():
    config = SpeculativeConfig(max_new, capacity, sampling_config, eos_ids, **shape)
    outs[name] = driver.generate(TARGET[0], TARGET[1], jnp.asarray(padded), jnp.asarray(lengths),
                                 config, jax.random.PRNGKey(0), DRAFT[0], DRAFT[1])
  outs['medusa'] = _medusa(TARGET, _heads(TARGET[0], 2, seed=2), prompts, max_new, capacity,
                           tree=trees.TreeSpec((2, 2)), eos_ids=eos_ids,
                           sampling=sampling_config)
  from decoding import jacobi, lookahead, lookup
  for name, config in (('lookup', lookup.LookupConfig(max_new, capacity, sampling_config,
                                                      eos_ids, min_ngram=1)),
                       ('jacobi', jacobi.JacobiConfig(max_new, capacity, sampling_config,
                                                      eos_ids, window=3)),
                       ('lookahead', lookahead.LookaheadConfig(
                           max_new, capacity, sampling_config, eos_ids, window=2, ngram=3,
                           candidates=2))):
    outs[name] = driver.generate(TARGET[0], TARGET[1], jnp.asarray(padded), jnp.asarray(lengths),
                                 config, jax.random.PRNGKey(0))
  return outs


def _ar_eos(prompts, max_new, capacity, eos_ids, sampling_config=SamplingConfig()):
  from decoding import autoregressive
  padded, lengths = driver.pad_prompts(prompts)
  config = autoregressive.AutoregressiveConfig(max_new, capacity, sampling_config, eos_ids)
  return driver.generate(TARGET[0], TARGET[1], jnp.asarray(padded), jnp.asarray(lengths),
                         config, jax.random.PRNGKey(0))


NEVER = 100   # a padded id (>= the vocabulary's 60): a stop id that never fires


# ------------------------------------------------------------------ 1. stop ids


def _chat_tokenizer_json():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['return value as easy as a test'] * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<eot>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok.to_str()


def test_stop_ids_are_every_id_any_file_declares(tmp_path):
  """config.json eos 0, generation_config.json [2, 0] (Llama-3-Instruct's layout), and
  tokenizer_config.json's eos_token <eot> (id 3): the stop set is all three."""
  from training import hf
  directory = str(tmp_path)
  with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
    f.write(_chat_tokenizer_json())
  for name, payload in (('generation_config.json', {'eos_token_id': [2, 0]}),
                        ('tokenizer_config.json', {'eos_token': '<eot>'})):
    with open(os.path.join(directory, name), 'w') as f:
      json.dump(payload, f)
  tok = hf.read_tokenizer(directory, {'eos_token_id': 0}, 300)
  assert tok.eos_id == 0 and sorted(tok.eos_ids) == [0, 2, 3]


def test_every_method_stops_at_every_stop_id_with_finish_reasons():
  """A stop id listed after the first (an end-of-turn id from generation_config) ends
  every method's output right after it: finish reason stop with that id. The same call
  has rows that end by length (3 or 2 prompt tokens + 6 new fit in 12) and by context
  (7 + 6 do not)."""
  prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
  free = _ar_eos(prompts, 6, 12, (NEVER,))
  assert free.finish_reasons() == [{'reason': 'length'}] * 2 + [{'reason': 'context'}]
  free = free.completions()
  assert [len(row) for row in free] == [6, 6, 5]
  stop = free[0][2]                       # row 0's 3rd token becomes an end-of-turn id
  expected, reasons = [], []
  for row in free:
    cut = row[:row.index(stop) + 1] if stop in row else row
    expected.append(cut)
    reasons.append({'reason': 'stop', 'stop_id': stop} if stop in row else
                   {'reason': 'length' if len(cut) == 6 else 'context'})
  for name, out in _every_method(prompts, 6, 12, (NEVER, stop)).items():
    assert out.completions() == expected, name
    assert out.finish_reasons() == reasons, name


# ------------------------------------------------------------------ 2. vocabularies


def _model(seed, vocab, multiple, **kw):
  model = Transformer(TransformerConfig(vocab_size=vocab, vocab_multiple=multiple, **kw))
  z = jnp.zeros((1, 1), jnp.int32)
  return model, params_init(model, seed, z, z)['params']


SMALL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1)


@pytest.mark.parametrize('direction', ['larger-draft', 'larger-target'])
def test_draft_and_target_vocabularies_of_different_sizes(direction):
  """Target vocab 60 padded to 128. Larger draft: vocab 188 padded to 256 (the padded
  embedding of Qwen2-0.5B drafting for 72B). Larger target: the draft pads only to 64.
  Every draft shape runs; greedy equals the target's AR; T=1 draws only real ids."""
  draft = (_model(1, 188, 128, **SMALL) if direction == 'larger-draft'
           else _model(1, 60, 4, **SMALL))
  assert draft[0].config.padded_vocab_size != TARGET[0].config.padded_vocab_size
  prompts = PROMPTS[:2]
  ar = _ar(*TARGET, prompts, 10, 24)
  for name, shape in SPEC_SHAPES.items():
    out = _spec(TARGET, draft, prompts, 10, 24, **shape)
    np.testing.assert_array_equal(out.tokens, ar.tokens, err_msg=name)
    if name != 'dynamic-tree' and direction == 'larger-draft':
      out = _spec(TARGET, draft, prompts, 10, 24, sampling=SamplingConfig(temperature=1.0),
                  **shape)
      assert all(0 <= t < 60 for row in out.completions() for t in row), name


def test_vocab_conform_gives_no_mass_past_either_vocabulary():
  logits = jnp.zeros((1, 256))
  wide = speculative.conform_vocab(logits, 188, 60, 128)
  assert wide.shape == (1, 128) and bool(jnp.all(jnp.isinf(wide[:, 60:])))
  narrow = speculative.conform_vocab(jnp.zeros((1, 64)), 60, 60, 128)
  assert narrow.shape == (1, 128) and bool(jnp.all(jnp.isinf(narrow[:, 60:])))
  assert bool(jnp.all(narrow[:, :60] == 0))


def test_tokenizer_check_compares_what_tokenizers_do(tmp_path):
  """Same vocabulary, merges and added tokens -> compatible, whatever the draft's own
  BOS / EOS ids and the JSON's formatting; other merges -> refused, without telling the
  user to retrain an imported draft."""
  from launch import generation
  from training import tokenizers
  text = _chat_tokenizer_json()
  spec = json.loads(text)
  reformatted = json.dumps(spec, indent=2, sort_keys=True)
  target = tokenizers.HuggingFaceTokenizer(text, 300, None, [2], None)
  draft = tokenizers.HuggingFaceTokenizer(reformatted, 320, 1, [0, 3], 0, add_bos=True)
  assert draft.fingerprint() == target.fingerprint()
  spec['model']['merges'] = spec['model']['merges'][:-1]
  other = tokenizers.HuggingFaceTokenizer(json.dumps(spec), 300, None, [2], None)
  assert other.fingerprint() != target.fingerprint()

  class Restored:
    def __init__(self, tok, workdir):
      self.tokenizer, self.workdir = tok, workdir
  generation.check_draft(Restored(target, 't'), Restored(draft, 'd'))
  with pytest.raises(ValueError, match='another tokenizer') as e:
    generation.check_draft(Restored(target, 't'), Restored(other, 'd'))
  assert 'retrain' not in str(e.value)


# ------------------------------------------------------------------ 3. temperatures


TINY = [1e-30, 1e-35, 1e-37, 2e-38, 1.1754944e-38, 1e-38, 1e-40, 1e-45, 5e-324]
HUGE = [1e30, 1e37, 3e38, float(np.finfo(np.float32).max)]


def test_log_probs_and_samples_are_finite_for_every_positive_temperature():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 130)) * 30
  best = np.argmax(np.asarray(logits[:, :100]), -1)
  for t in TINY + HUGE + [0.5, 1.0, 7.0]:
    config = SamplingConfig(temperature=t, top_p=0.9 if t > 1 else 1.0)
    lp = np.asarray(sampling.log_probs(logits, config, 100))
    assert not np.isnan(lp).any() and not np.isposinf(lp).any(), t
    assert np.isneginf(lp[:, 100:]).all(), t
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5, err_msg=str(t))
    drawn = np.asarray(sampling.sample(jax.random.PRNGKey(1), logits, config, 100))
    assert (drawn < 100).all(), t
    if t <= 1e-30:
      np.testing.assert_array_equal(drawn, best, err_msg=str(t))
  for bad in (float('inf'), float('nan'), 1e39, -1e-38):
    with pytest.raises(ValueError, match='temperature'):
      SamplingConfig(temperature=bad)


def test_tiny_temperatures_give_the_greedy_tokens_for_every_method():
  """1e-38 (a float32 subnormal: greedy by rule) and 1e-37 (normal: the max-shifted
  division) both reproduce greedy decoding in every method; a huge one runs cleanly."""
  prompts = PROMPTS[:2]
  greedy = _ar(*TARGET, prompts, 8, 20).completions()
  assert SamplingConfig(temperature=1e-38).greedy
  assert not SamplingConfig(temperature=1e-37).greedy
  for name, out in _every_method(prompts, 8, 20, (2,), SamplingConfig(temperature=1e-37)).items():
    assert out.completions() == greedy, name
  out = _spec(TARGET, DRAFT, prompts, 8, 20, num_draft=3, sampling=SamplingConfig(
      temperature=3e38))
  assert all(0 <= t < 60 for row in out.completions() for t in row)


# ------------------------------------------------------------------ 4. completion text


def _metaspace_tokenizer_json():
  """A Llama-2-style tokenizer: Metaspace pieces, decoder Replace / ByteFallback / Fuse /
  Strip of one leading space."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.train_from_iterator(['return value as easy asey test'] * 5, trainers.BpeTrainer(
      vocab_size=200, special_tokens=['<unk>', '<s>', '</s>']))
  return tok.to_str()


@pytest.mark.parametrize('kind', ['metaspace', 'byte-level'])
def test_completion_text_continues_the_prompt(kind):
  from launch import generation
  from training import tokenizers
  text = _metaspace_tokenizer_json() if kind == 'metaspace' else _chat_tokenizer_json()
  tok = tokenizers.HuggingFaceTokenizer(text, 300, 1, [2], 0, add_bos=kind == 'metaspace')
  prompt = tok.encode_prompt('return value').tolist()
  full = tok.encode_prompt('return value asey').tolist()
  assert full[:len(prompt)] == prompt
  new = full[len(prompt):]
  completion = generation.completion_text(tok, prompt, new)
  assert completion == ' asey'
  assert tok.decode(prompt) + completion == tok.decode(full) == 'return value asey'


# ------------------------------------------------------------------ 5. finish reasons


def test_decode_texts_reports_finish_reasons(trained_tiny):
  from launch import generation
  options = generation.DecodeOptions(max_new_tokens=8, max_context=20)
  result = generation.decode_texts(trained_tiny, ['def f(', 'import os\nimport'],
                                   'autoregressive', options)
  reasons = [o['finish_reason'] for o in result['outputs']]
  assert reasons[1] == 'context' and reasons[0] in ('length', 'stop')
  assert 'finish_reasons' not in result['stats']
  for out in result['outputs']:
    assert ('stop_id' in out) == (out['finish_reason'] == 'stop')


# ------------------------------------------------------------------ 6. bfloat16


def test_bfloat16_outputs_equal_ar_or_leave_it_at_a_near_tie():
  """The bfloat16 contract for every method: each row equals plain AR's, or first
  differs where AR's top-2 logits are within the stated near-tie bound."""
  from launch import benchmarking
  global TARGET, DRAFT
  saved = TARGET, DRAFT
  bf16 = dict(dtype='bfloat16')
  try:
    TARGET = _model(0, 60, 128, num_layers=2, **bf16)
    DRAFT = _model(1, 60, 128, **SMALL, **bf16)
    prompts = PROMPTS
    ar = _ar_eos(prompts, 16, 30, (NEVER,)).completions()
    for name, out in _every_method(prompts, 16, 30, (NEVER,)).items():
      verdict = benchmarking.ar_agreement(TARGET[0], TARGET[1], prompts, ar, out.completions())
      assert verdict in ('identical', 'near-tie'), name
    # Change the first token of the row whose AR top-2 gap there is widest (far from a tie).
    changed = [[(row[0] + 1) % 60, *row[1:]] for row in ar]
    gaps = [benchmarking.first_divergence(TARGET[0], TARGET[1], p, a, c)
            for p, a, c in zip(prompts, ar, changed)]
    row = max(range(len(ar)), key=lambda i: gaps[i][1] - gaps[i][2])
    assert gaps[row][1] > gaps[row][2]
    wrong = [changed[i] if i == row else ar[i] for i in range(len(ar))]
    assert benchmarking.ar_agreement(TARGET[0], TARGET[1], prompts, ar, wrong) == 'differs'
  finally:
    TARGET, DRAFT = saved


def test_an_option_of_another_method_is_refused():
  from decoding import registry
  from launch import generation
  options = generation.DecodeOptions(num_draft=6)
  with pytest.raises(ValueError, match=r'--num_draft is an option of speculative, lookup, '
                                       r'self_speculative(, \w+)*, not of '
                                       r'--method=autoregressive'):
    registry.check_options(registry.get('autoregressive'), options)
  registry.check_options(registry.get('speculative'), options)
  reset = registry.options_for(registry.get('medusa'), generation.DecodeOptions(
      num_draft=6, tree='2,2'))
  assert reset.num_draft == 4 and reset.tree == '2,2'
