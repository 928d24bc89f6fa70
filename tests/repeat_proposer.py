"""A new decoding method in one file: the proof that the proposer interface is real.

The proposer drafts the last committed token repeated K times, a deterministic chain
(no draft distribution: the verifier's point-mass rule keeps it lossless). It is
registered as `repeat_last`, so `launch.decode --plugins=tests.repeat_proposer
--method=repeat_last` and `launch.bench` with config.plugins run it like any method.
"""
import dataclasses

import jax.numpy as jnp

from decoding import driver, registry
from decoding.proposal import Proposal, Proposer


@dataclasses.dataclass(frozen=True)
class RepeatConfig(driver.DecodeConfig):
  num_draft: int = 3       # K: copies of the last token proposed per round

  def proposer(self, model, drafter):
    del model, drafter
    return RepeatProposer(self.num_draft)


class RepeatProposer(Proposer):

  def __init__(self, num_draft: int):
    self.max_depth = num_draft

  def propose(self, params, state, loop_state, key):
    rows = jnp.arange(loop_state.tokens.shape[0])
    root = loop_state.tokens[rows, loop_state.lengths - 1]                   # [B]
    drafted = jnp.repeat(root[:, None], self.max_depth, axis=1)              # [B, K]
    return Proposal.chain(root, drafted), state, jnp.zeros((), jnp.int32)


registry.register(registry.Method(
    'repeat_last', 'repeat_last',
    lambda options, capacity, eos_ids, model, drafter: RepeatConfig(
        **registry.base_settings(options, capacity, eos_ids), num_draft=options.num_draft),
    options=('num_draft',)))  # the method-specific options it reads (check_options)
