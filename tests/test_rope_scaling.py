"""Rotary scaling (linear, dynamic NTK, YaRN, Llama-3) and sliding-window attention
(Mistral, Qwen2) of imported checkpoints, against transformers on random small models
with prompts past the original context / past the window."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from launch import conversion, generation  # noqa: E402
from models import TransformerConfig  # noqa: E402
from training import hf  # noqa: E402
from tests import hf_reference  # noqa: E402
from tests.test_hf import VOCAB, _our_logits, tokenizer_json  # noqa: E402,F401

ORIGINAL = 32  # the original context of every scaled model below
ROPE = {
    'linear': {'rope_type': 'linear', 'factor': 2.0},
    'dynamic': {'rope_type': 'dynamic', 'factor': 3.0},
    'yarn': {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': ORIGINAL,
             'beta_fast': 8.0, 'beta_slow': 0.5},
    'llama3': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': ORIGINAL},
}


def _save(directory, tokenizer_json, config, model_class, seed=0):
  for key, value in dict(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.1).items():
    setattr(config, key, value)
  torch.manual_seed(seed)
  model = model_class(config).eval()
  model.save_pretrained(directory)
  (directory / 'tokenizer.json').write_text(tokenizer_json)
  return model


def _reset(model):
  """transformers' dynamic rope keeps the largest length it has seen; a call shorter than
  the original context resets it, so each reference call below starts fresh (as one
  `generate` of a newly loaded model does)."""
  with torch.no_grad():
    model(torch.tensor([[1]]))


def _reference_logits(model, ids):
  _reset(model)
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _reference_greedy(model, prompts, max_new, eos=2):
  return hf_reference.reference_greedy(model, prompts, max_new, eos, before_each=_reset)


def _prompts(count, length, seed=1):
  rng = np.random.RandomState(seed)
  return [[1, *rng.randint(3, VOCAB, length - 1).tolist()] for _ in range(count)]


@pytest.mark.parametrize('kind', list(ROPE))
def test_scaled_rotary_equals_transformers(kind, tokenizer_json, tmp_path):
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=ORIGINAL if kind in ('linear', 'dynamic') else 4 * ORIGINAL,
      rope_parameters={**ROPE[kind], 'rope_theta': 1000.0})
  reference = _save(tmp_path / 'hf', tokenizer_json, config, transformers.LlamaForCausalLM)
  restored = conversion.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ours'))
  assert restored.model.config.rope_type == kind

  # Forwards past the original context (and one within it: dynamic's unscaled regime).
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 3 * ORIGINAL))
  for length in (3 * ORIGINAL, 2 * ORIGINAL - 7, ORIGINAL - 4):
    np.testing.assert_allclose(_our_logits(restored, ids[:, :length]),
                               _reference_logits(reference, ids[:, :length]),
                               atol=2e-5, rtol=0)

  # Greedy decoding from prompts already past the original context == generate.
  prompts = _prompts(3, ORIGINAL + 9)
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive',
                                     generation.DecodeOptions(max_new_tokens=24))
  assert ours == _reference_greedy(reference, prompts, 24)
  # Prompts longer than the prefill chunk (driver.chunked_prefill): the same tokens. A
  # dynamic-NTK model prefills in one call (chunks would rotate with other frequencies).
  long = _prompts(2, 3 * ORIGINAL + 5, seed=2)
  chunked, _ = generation.decode_tokens(restored, long, 'autoregressive',
                                        generation.DecodeOptions(max_new_tokens=12,
                                                                 prefill_chunk=16))
  assert chunked == _reference_greedy(reference, long, 12)
  if kind == 'dynamic':  # Multi-token verification calls would not be lossless: refused.
    with pytest.raises(ValueError, match='dynamic NTK scaling'):
      generation.decode_tokens(restored, prompts, 'speculative',
                               generation.DecodeOptions(max_new_tokens=4), restored)

  # Export writes the scaling back: transformers computes the same logits from it.
  conversion.export_hf(str(tmp_path / 'ours'), str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  np.testing.assert_allclose(_reference_logits(reloaded, ids), _reference_logits(reference, ids),
                             atol=1e-5, rtol=0)
  again = conversion.import_hf(str(tmp_path / 'exported'), str(tmp_path / 'again'))
  assert again.model.config == restored.model.config


def test_sliding_window_equals_transformers_plain_and_under_tree_masks(tokenizer_json,
                                                                      tmp_path):
  window = 3
  config = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=window)
  reference = _save(tmp_path / 'hf', tokenizer_json, config, transformers.MistralForCausalLM)
  restored = conversion.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ours'))
  assert restored.model.config.sliding_window == window

  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 5 * window))
  expected = _reference_logits(reference, ids)
  np.testing.assert_allclose(_our_logits(restored, ids), expected, atol=1e-5, rtol=0)
  # The window matters at this length: the same weights attending to everything differ.
  full = dataclasses.replace(restored, model=type(restored.model)(
      dataclasses.replace(restored.model.config, sliding_window=0)))
  assert np.abs(_our_logits(full, ids) - expected).max() > 1e-3

  prompts = _prompts(2, 3 * window + 1)
  expected_tokens = _reference_greedy(reference, prompts, 24)
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive',
                                     generation.DecodeOptions(max_new_tokens=24))
  assert ours == expected_tokens
  # Speculative decoding, the model as its own draft: tree nodes sit at slot root + i but
  # position root + depth, and their window follows the position. In this tree the
  # accepted (top) path's node at depth j >= 2 sits at slot root + 2j - 1, so a window
  # taken from slots would let its depth j + 3 descendant see it (3 > window - 1 = 2).
  for tree in ('2,1,1,1,1', ''):  # a tree and a chain
    spec, _ = generation.decode_tokens(restored, prompts, 'speculative', generation.DecodeOptions(
        max_new_tokens=24, tree=tree, num_draft=5), restored)
    assert spec == expected_tokens

  conversion.export_hf(str(tmp_path / 'ours'), str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  assert type(reloaded).__name__ == 'MistralForCausalLM'
  np.testing.assert_allclose(_reference_logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_qwen2_sliding_window_from_max_window_layers(tokenizer_json, tmp_path):
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
      num_attention_heads=8, num_key_value_heads=2, use_sliding_window=True,
      sliding_window=6, max_window_layers=1)
  reference = _save(tmp_path / 'hf', tokenizer_json, config, transformers.Qwen2ForCausalLM)
  restored = conversion.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ours'))
  c = restored.model.config
  assert (c.sliding_window, c.window_start_layer) == (6, 1)
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 30))
  np.testing.assert_allclose(_our_logits(restored, ids), _reference_logits(reference, ids),
                             atol=1e-5, rtol=0)
  prompts = _prompts(2, 20)
  ours, _ = generation.decode_tokens(restored, prompts, 'autoregressive',
                                     generation.DecodeOptions(max_new_tokens=16))
  assert ours == _reference_greedy(reference, prompts, 16)


def test_unknown_or_incomplete_rope_scaling_is_one_clear_error():
  base = dict(architectures=['LlamaForCausalLM'], num_hidden_layers=2, hidden_size=64,
              num_attention_heads=4, intermediate_size=96, max_position_embeddings=32)
  with pytest.raises(hf.UnsupportedCheckpointError, match="rope scaling 'longrope'"):
    hf.model_config({**base, 'rope_scaling': {'type': 'longrope', 'short_factor': [1.0]}})
  with pytest.raises(hf.UnsupportedCheckpointError, match="rope scaling 'su'"):
    hf.model_config({**base, 'rope_parameters': {'rope_type': 'su'}})
  with pytest.raises(hf.UnsupportedCheckpointError, match='partial_rotary_factor'):
    hf.model_config({**base, 'partial_rotary_factor': 0.5})
  # Old-style rope_scaling ('type', rope_theta outside) reads as transformers reads it.
  block = hf.model_config({**base, 'rope_theta': 500000.0, 'rope_scaling': {
      'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192}})
  assert (block['rope_type'], block['rope_theta'], block['rope_original_max']) == (
      'llama3', 500000.0, 8192)
  assert 'rope_type' not in hf.model_config(base)  # unscaled configs are unchanged
  with pytest.raises(ValueError, match="rope_type='ntk'"):
    TransformerConfig(vocab_size=8, rope_type='ntk')
