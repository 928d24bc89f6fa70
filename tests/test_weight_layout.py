"""The decoding layout of the block weights (models.transformer.decoding_layout, chosen by
launch.generation.decoding_params): the same function as the stacked layout for every
trunk option and weight format, and every method decodes the same tokens from it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import generation
from models import Transformer, TransformerConfig, quant, transformer
from tests import test_model
from tests.params import init as params_init


def _model(**overrides):
  config = TransformerConfig(**{'vocab_size': 300, 'num_layers': 3, **overrides})
  model = Transformer(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  return config, model, params_init(model, 0, tokens, tokens)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('orientation', transformer.ORIENTATIONS)
@pytest.mark.parametrize('overrides', [
    dict(), dict(qkv_bias=True, num_kv_heads=1), dict(sliding_window=4, window_start_layer=1),
    dict(mtp_heads=3), dict(exit_layers=(1,), exit_norm=True)])
def test_the_layout_computes_the_stacked_function(overrides, orientation):
  """Full forward (no cache) and cached incremental logits (three tokens per call; one
  token per call is every decode below) agree with the stacked parameters to float32
  rounding; MTP heads' logits too; in both orientations ([out, in] and [in, out])."""
  config, model, params = _model(**overrides)
  laid = {'params': transformer.decoding_layout(params['params'], orientation)}
  attention = laid['params']['layers']['attention']
  assert isinstance(attention['qkv'], transformer.PerLayer) and 'q' not in attention
  assert len(attention['qkv'].arrays) == 3
  fused = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
  columns = orientation == 'columns'
  assert attention['qkv'].arrays[0].shape == ((config.d_model, fused) if columns
                                              else (fused, config.d_model))
  assert attention['qkv'].transposed == columns and not attention['o'].transposed
  mlp = laid['params']['layers']['mlp']
  assert isinstance(mlp['gate_up'], transformer.PerLayer) and mlp['down'].transposed == columns
  assert transformer.decoding_layout(laid['params']) is laid['params']   # idempotent
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 3, 300)
  positions = test_model._positions(2, 12)
  want, got = (test_model._jit_apply(model)(p, tokens, positions) for p in (params, laid))
  _close(got.logits, want.logits)
  if config.mtp_heads > 1:
    _close(got.future_logits, want.future_logits)
  _close(test_model._incremental_logits(model, laid, config, tokens, [4, 6], 16, chunk=3),
         test_model._incremental_logits(model, params, config, tokens, [4, 6], 16, chunk=3))


def test_layer_skipping_and_state_propagation_read_the_layout():
  """The layer-skipping forward (a static and a traced block list) and CALM's state
  propagation (keys/values of the skipped blocks) read a block's weights by index."""
  config, model, params = _model(num_layers=4)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 6), 3, 300)
  positions = test_model._positions(2, 6)
  cache = transformer.KVCache.empty(config, 2, 8)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 6, config.d_model))
  slots = jnp.broadcast_to(jnp.arange(6), (2, 6))
  propagate = jax.jit(lambda p: model.apply(p, x, positions, cache, slots, 1,
                                            method=Transformer.propagate))
  for orientation in transformer.ORIENTATIONS:
    laid = {'params': transformer.decoding_layout(params['params'], orientation)}
    for layers in ((0, 2, 3), jnp.asarray([1, 3], jnp.int32)):
      run = jax.jit(lambda p, layers=layers: model.apply(p, tokens, positions,
                                                         layers=layers).logits)
      _close(run(laid), run(params))
    for got, want in zip(jax.tree.leaves(propagate(laid)), jax.tree.leaves(propagate(params))):
      _close(got, want)


@pytest.mark.parametrize('orientation', transformer.ORIENTATIONS)
@pytest.mark.parametrize('fmt', ['int8', 'int4', 'mixed'])
def test_quantized_weights_keep_their_groups_in_the_layout(fmt, orientation):
  """Quantized weights are rearranged field by field (the scales follow their values);
  a group mixing float and quantized weights (a GGUF file may) keeps separate weights."""
  pytest.importorskip('qwix', reason='quantization uses qwix (pip install qwix)')
  config, model, params = _model(num_kv_heads=2)
  qparams = quant.quantize_params(params['params'], 'int8' if fmt == 'mixed' else fmt, group=16)
  if fmt == 'mixed':
    layers = qparams['layers']
    layers['attention']['k'] = quant.dequantize(layers['attention']['k'])
    layers['mlp']['up'] = quant.dequantize(layers['mlp']['up'])
  laid = transformer.decoding_layout(qparams, orientation)
  attention, mlp = laid['layers']['attention'], laid['layers']['mlp']
  if fmt == 'mixed':
    assert {'q', 'k', 'v', 'o'} <= set(attention) and {'gate', 'up', 'down'} <= set(mlp)
    assert quant.is_quantized(attention['q'].arrays[0]) and not quant.is_quantized(
        attention['k'].arrays[0])
  else:
    assert quant.is_quantized(attention['qkv'].arrays[0])
    assert quant.is_quantized(mlp['down'].arrays[0])
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 3, 300)
  _close(test_model._incremental_logits(model, {'params': laid}, config, tokens, [3, 5], 12),
         test_model._incremental_logits(model, {'params': qparams}, config, tokens, [3, 5], 12))


def test_every_method_decodes_the_same_tokens_from_the_layout(trained_tiny, trained_eagle,
                                                               trained_mtp):
  """Greedy decoding on one device from the decoding layout (per_block) equals the
  stacked layout, for the trunk's every way of running its blocks: the whole scan (AR;
  at batch 1 in the 'rows' orientation, else 'columns'), block subsets
  (self-speculation), a drafter reading the target's hidden states (EAGLE), MTP heads
  (the three in 'columns': they verify several tokens per call)."""
  tok = trained_tiny.tokenizer
  texts = ('import os\nimport sys\n', 'def __init__(self', 'class Foo:\n    ')
  prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
  runs = [('autoregressive', trained_tiny, None, 1), ('autoregressive', trained_tiny, None, 3),
          ('self_speculative', trained_tiny, None, 3), ('eagle', trained_tiny, trained_eagle[1], 3),
          ('mtp', trained_mtp[1], None, 3)]
  for method, target, draft, batch in runs:
    out = {}
    for layout in ('stacked', 'per_block'):
      out[layout], stats = generation.decode_tokens(
          target, prompts, method, generation.DecodeOptions(
              max_new_tokens=16, weight_layout=layout, batch_size=batch), draft)
      assert stats['weight_layout'] == layout
    # One row of one token per call: rows; several rows or tokens per call: columns.
    assert stats['weight_orientation'] == ('rows' if method == 'autoregressive' and batch == 1
                                           else 'columns')
    assert out['per_block'] == out['stacked'], (method, batch)


def test_bad_layouts_are_one_line_errors(trained_tiny):
  with pytest.raises(ValueError, match=r'--weight_layout=rows; expected one of auto'):
    generation.decode_tokens(trained_tiny, [[1, 5]], 'autoregressive',
                             generation.DecodeOptions(max_new_tokens=2, weight_layout='rows'))
  with pytest.raises(ValueError, match='per_block decodes on one device'):
    generation.decode_tokens(trained_tiny, [[1, 5]], 'autoregressive', generation.DecodeOptions(
        max_new_tokens=2, weight_layout='per_block', model_parallelism=2))
  assert generation.effective_layout('auto', 8) == 'stacked'
  with pytest.raises(ValueError, match="orientation='diagonal'; expected one of rows, columns"):
    transformer.decoding_layout(trained_tiny.params, 'diagonal')
