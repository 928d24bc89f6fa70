"""The family map: a training config's `family` -> the Flax module it trains.

Checkpoints (to restore a workdir) and objectives (to train one) both build their
module and its parameter tree here, so a workdir restores without the objective and
without its target. A config is duck-typed (an ml_collections ConfigDict, or anything
with the same fields): `family`, `model` (models.TransformerConfig fields but
vocab_size; `.to_dict()`) and, for Medusa, `medusa.num_heads` and `medusa.joint`.
This module imports nothing from training/ or configs/.

  family    module                        parameters
  ar_lm     Transformer(config.model)     the Transformer's
  distill   Transformer(config.model)     the draft's (the teacher is not state)
  mtp       Transformer(config.model)     the Transformer's (model.mtp_heads >= 2)
  medusa    MedusaHeads(target, K)        {'heads'}; Medusa-2 (medusa.joint): {'heads', 'base'},
                                          'base' shaped as the target Transformer
  eagle     EagleDrafter(target)          the drafter's one layer (+ fc)
  eagle3    EagleDrafter(target, layers)  EAGLE-3: the same + the fusion of the target's
                                          eagle3.feature_layers blocks and a final norm
  cllm      Transformer(config.model)     the Transformer's: a target fine-tuned by consistency
                                          training, still a plain LM
  bd3lm     BlockDiffusionLM(config.model, the Transformer's, vocabulary + 1 (the mask
            bd3lm.block_size)             token): a block diffusion LM (models/block_diffusion.py)
  tidar     TidarLM(config.model,         the Transformer's, vocabulary + 1 (the mask token):
            tidar.block_size)             one model, AR LM and block diffusion drafter (TiDAR)
  asarm     AnySubsetLM(config.model)     the Transformer's, vocabulary + 1 (the query
                                          token [MASK]): an any-subset autoregressive model
                                          (models/any_subset.py)
  early_exit Transformer(config.model)    the Transformer's with exit heads at
                                          model.exit_layers (shared final norm and unembedding,
                                          optional per-exit norms, CALM's exit classifier);
                                          still a plain LM at its last layer
  parallel_drafter  ParallelDrafter(target,  the drafter's layers, fusion and mask embedding
            parallel_drafter.*)           (DFlash, models/parallel_drafter.py)

For the heads families (medusa, eagle) config.model is the target's model block: the
trainer copies it from target_workdir, and the heads read the target's hidden states.
"""
from typing import Any, Optional

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import (AnySubsetLM, BlockDiffusionLM, EagleDrafter, MedusaHeads, ParallelDrafter,
                    TidarLM, Transformer, TransformerConfig, masks)
from models.heads import check_feature_layers
from models.parallel_drafter import default_target_layers

FAMILIES = ('ar_lm', 'distill', 'medusa', 'eagle', 'eagle3', 'mtp', 'cllm', 'bd3lm', 'tidar',
            'asarm', 'early_exit', 'parallel_drafter')
# Trained on a frozen target_workdir, whose model and tokenizer they take.
HEADS_FAMILIES = ('medusa', 'eagle', 'eagle3', 'parallel_drafter')

# family -> (training config, the trunk's TransformerConfig) -> the module it trains.
_MODULES = {
    'ar_lm': lambda config, trunk: Transformer(trunk),
    'distill': lambda config, trunk: Transformer(trunk),
    'mtp': lambda config, trunk: Transformer(trunk),
    'medusa': lambda config, trunk: MedusaHeads(trunk, config.medusa.num_heads),
    'eagle': lambda config, trunk: EagleDrafter(trunk),
    'eagle3': lambda config, trunk: EagleDrafter(
        trunk, check_feature_layers(config.eagle3.feature_layers, trunk.num_layers)),
    'cllm': lambda config, trunk: Transformer(trunk),
    # The mask token extends the tokenizer's vocabulary by one id.
    'bd3lm': lambda config, trunk: BlockDiffusionLM(
        dataclasses.replace(trunk, vocab_size=trunk.vocab_size + 1),
        block_size=config.bd3lm.block_size),
    'tidar': lambda config, trunk: TidarLM(
        dataclasses.replace(trunk, vocab_size=trunk.vocab_size + 1),
        block_size=config.tidar.block_size),
    # The query token [MASK] extends the tokenizer's vocabulary by one id.
    'asarm': lambda config, trunk: AnySubsetLM(
        dataclasses.replace(trunk, vocab_size=trunk.vocab_size + 1)),
    'early_exit': lambda config, trunk: Transformer(trunk),
    'parallel_drafter': lambda config, trunk: parallel_drafter(config.parallel_drafter, trunk),
}


def parallel_drafter(settings, trunk: TransformerConfig) -> ParallelDrafter:
  """The DFlash drafter of a config's `parallel_drafter` block (num_layers, block_size,
  target_layers: a tuple of target block indices, empty = default_target_layers) on the
  target trunk `trunk`. Raises ValueError for a target layer outside the trunk."""
  layers = tuple(settings.target_layers) or default_target_layers(trunk.num_layers)
  for layer in layers:
    if not 0 <= layer < trunk.num_layers:
      raise ValueError(f'parallel_drafter.target_layers holds {layer}; the target has '
                       f'{trunk.num_layers} blocks (0 .. {trunk.num_layers - 1}).')
  return ParallelDrafter(trunk, num_layers=settings.num_layers, block_size=settings.block_size,
                         target_layers=layers)


def transformer_config(config, vocab_size: int) -> TransformerConfig:
  """The trunk's static config from the `model` block of a training config."""
  return TransformerConfig(vocab_size=vocab_size, **config.model.to_dict())


def _check_family(family: str) -> None:
  if family not in _MODULES:
    raise ValueError(f'Unknown model family {family!r}; known: {", ".join(FAMILIES)}.')


def build_module(config, vocab_size: int) -> nn.Module:
  """The Flax module a workdir of `config` holds the parameters of (what decoding runs)."""
  _check_family(config.family)
  return _MODULES[config.family](config, transformer_config(config, vocab_size))


def base_module(config, vocab_size: int) -> Optional[Transformer]:
  """The target trunk whose parameters train with the heads, as params['base']
  (Medusa-2: family medusa with medusa.joint); None for every other config."""
  if config.family == 'medusa' and config.medusa.joint:
    return Transformer(transformer_config(config, vocab_size))
  return None


def example_batch() -> dict:
  """A [1, 1] batch (inputs, positions, segment_ids): enough for `init_params` to know
  every parameter's shape."""
  z = jnp.zeros((1, 1), jnp.int32)
  return {'inputs': z, 'positions': z, 'segment_ids': jnp.ones((1, 1), jnp.int32)}


def init_params(module: nn.Module, rng: jax.Array, batch: dict,
                base: Optional[Transformer] = None) -> Any:
  """A family module's parameters (boxed with logical axis names) for a batch of this
  shape (inputs, positions, segment_ids [B, T]).

  module: Transformer (ar_lm, distill, mtp), MedusaHeads or EagleDrafter. The heads
  read [B, T, D] hidden states (zeros here); Medusa's parameters are {'heads'} plus,
  when `base` (the target Transformer, Medusa-2) is given, {'base'}: both from `rng`.
  """
  if isinstance(module, MedusaHeads):
    hidden = jnp.zeros(batch['inputs'].shape + (module.config.d_model,), jnp.float32)
    params = {'heads': module.init(rng, hidden)['params']}
    if base is not None:
      params['base'] = base.init(rng, batch['inputs'], batch['positions'])['params']
    return params
  if base is not None:
    raise ValueError(f'Only Medusa heads train with a base; got {type(module).__name__}.')
  if isinstance(module, EagleDrafter):
    features = jnp.zeros(batch['inputs'].shape + (module.feature_size,), jnp.float32)
    embedded = jnp.zeros(batch['inputs'].shape + (module.config.d_model,), jnp.float32)
    return module.init(rng, features, embedded, batch['positions'])['params']
  if isinstance(module, ParallelDrafter):
    inputs = [jnp.zeros(s.shape, s.dtype) for s in module.example_inputs()]
    return module.init(rng, *inputs)['params']
  return module.init(rng, batch['inputs'], batch['positions'],
                     masks.packed_causal_mask(batch['segment_ids']))['params']


def abstract_params(config, vocab_size: int) -> Any:
  """The parameter tree a checkpoint of `config` holds, as unboxed ShapeDtypeStructs
  (for checking a checkpoint against its config.json). Builds no target."""
  module, base = build_module(config, vocab_size), base_module(config, vocab_size)
  return nn.meta.unbox(jax.eval_shape(lambda rng: init_params(module, rng, example_batch(), base),
                                      jax.random.PRNGKey(0)))
