"""Objectives: what a model family supplies to the one trainer.

An objective builds its model, initialises its parameters, computes a loss with
metrics from a batch, and says which parameters train (e.g. draft heads on a
frozen target). Metrics are *sums* over the batch (nll_sum, tokens, bytes) so
the trainer can average them over many eval batches exactly.

One file per family (ar_lm, mtp, distill, medusa, eagle and eagle3, early_exit; consistency
for cllm; block_diffusion for bd3lm; tidar; any_subset for asarm; parallel_drafter), each
with its objective class and `build(config, vocab_size)`; what they share is in `base`.
The module each family trains, and its parameter tree, come from the family map
(models/families.py), which checkpoints use too.
"""
from models.families import FAMILIES, HEADS_FAMILIES, transformer_config
from training.objectives import (any_subset, ar_lm, block_diffusion, consistency, distill, eagle,
                                 early_exit, medusa, mtp, parallel_drafter, tidar)
from training.objectives.any_subset import AnySubsetObjective
from training.objectives.ar_lm import LanguageModelObjective
from training.objectives.base import (Objective, Params, next_token_nll, shift_left,
                                      shifted_targets, summarize)
from training.objectives.block_diffusion import BlockDiffusionObjective
from training.objectives.consistency import ConsistencyObjective
from training.objectives.distill import DistillationObjective
from training.objectives.eagle import Eagle3Objective, EagleObjective
from training.objectives.early_exit import EarlyExitObjective
from training.objectives.medusa import MedusaObjective
from training.objectives.mtp import MultiTokenObjective
from training.objectives.parallel_drafter import ParallelDrafterObjective
from training.objectives.tidar import TidarObjective

# family -> build(config, vocab_size) -> Objective; the keys are models.families.FAMILIES.
BUILDERS = {'ar_lm': ar_lm.build, 'distill': distill.build, 'medusa': medusa.build,
            'eagle': eagle.build, 'eagle3': eagle.build_eagle3, 'mtp': mtp.build,
            'cllm': consistency.build, 'tidar': tidar.build,
            'bd3lm': block_diffusion.build, 'asarm': any_subset.build,
            'early_exit': early_exit.build, 'parallel_drafter': parallel_drafter.build}
assert set(BUILDERS) == set(FAMILIES), 'Each family of the family map needs an objective.'


def build(config, vocab_size: int) -> Objective:
  """The objective of `config.family`; distill, medusa and eagle restore their frozen
  target from `config.target_workdir`."""
  if config.family not in BUILDERS:
    raise ValueError(f'Unknown model family {config.family!r}; known: {", ".join(FAMILIES)}.')
  return BUILDERS[config.family](config, vocab_size)
