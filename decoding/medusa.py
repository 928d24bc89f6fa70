"""Medusa decoding (Cai et al. 2024): draft heads on the target's own hidden state;
and multi-token prediction self-speculation (Gloeckle et al. 2024), the same loop with
the heads built into the model (heads=None: the model's future_logits, head i + 1
predicting token t + i + 1, draft depth i).

The heads proposer for the round driver (decoding/driver.py). Each round:
  1. candidates: a node at depth d of rank r among its siblings takes head d's r-th
     best token, in a static tree: a TreeSpec (branching b_1 .. b_D, the Cartesian
     product of the heads' top-b_d) or a SparseTree (any shape, e.g. tuned on
     validation data by launch.tune_tree, as Medusa builds its trees); D <= heads;
  2. the target scores the whole tree in one call (tree mask, tree positions);
  3. `verify.tree_accept` walks it. Under greedy the children of a node are the heads'
     distinct top tokens and the rule is the point-mass one; under sampling they are
     drawn without replacement from the head's distribution and verified by recursive
     rejection sampling without replacement (tree_rule 'rrsw'), or are the top tokens
     with the point-mass rule ('specinfer'): lossless either way. `typical=True` swaps
     in Medusa's typical acceptance (LOSSY) on the top tokens;
  4. the heads read the target's hidden state at the last accepted node (the one whose
     logits gave the next token) and propose the next round's tree.
The first round's heads come from the prefill's hidden state at the prompt's end.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver, trees, verify
from decoding.proposal import Proposal, Proposer
from decoding.sampling import log_probs, mask_padded_vocab, sample_without_replacement


# The tree when none is given and the heads have no tuned one (launch.tune_tree):
# most width where the first head is unsure, as the heads' accuracy falls with depth.
DEFAULT_TREE = (4, 2, 2)


@dataclasses.dataclass(frozen=True)
class MedusaConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  tree: trees.TreeSpec | trees.SparseTree = trees.TreeSpec(DEFAULT_TREE)
  typical: bool = False          # LOSSY typical acceptance instead of the exact rule
  typical_epsilon: float = 0.09  # Medusa's posterior threshold
  typical_delta: float = 0.3     # Medusa's posterior alpha (its default: sqrt(epsilon))
  # Under exact sampling (verify.TREE_RULES): 'rrsw' draws each depth's candidates
  # without replacement from the head's distribution (recursive rejection sampling
  # without replacement verifies them); 'specinfer' takes the head's top-k (the
  # point-mass rule). Greedy and typical acceptance always take the top-k.
  tree_rule: str = 'rrsw'

  def __post_init__(self):
    verify.check_tree_rule(self.tree_rule)
    if not isinstance(self.tree, (trees.TreeSpec, trees.SparseTree)):
      raise ValueError(f'Draft heads fill a static tree (like "4,2,2" or "paths:0;1;0.0"); '
                       f'got {self.tree}.')

  @property
  def max_accepted(self) -> int:
    return self.tree.depth

  @property
  def acceptance(self) -> Optional[verify.TypicalAcceptance]:
    if self.typical:
      return verify.TypicalAcceptance(self.typical_epsilon, self.typical_delta)
    return None

  def proposer(self, model, drafter) -> 'HeadsProposer':
    return HeadsProposer(self, model, drafter)


class HeadsProposer(Proposer):
  """Draft heads on the target's own hidden state: Medusa heads (`heads`), or a
  multi-token prediction model's extra heads (heads=None). The state is the heads'
  logits at the last accepted node, [B, K, V]: head k's ranking of token root + k + 1."""

  def __init__(self, config: MedusaConfig, model, heads):
    num_heads = model.config.mtp_heads - 1 if heads is None else heads.num_heads
    if config.tree.depth > num_heads:
      raise ValueError(f'The tree is {config.tree.depth} deep but there are only {num_heads} '
                       'draft heads.')
    self.config, self.model, self.heads = config, model, heads
    self.max_depth, self.cache_slots = config.tree.depth, config.tree.num_nodes
    self.needs_key = (not config.sampling.greedy and not config.typical
                      and config.tree_rule == 'rrsw')

  def _read(self, params, out, nodes):
    """[B, K, V] the heads' logits at node nodes[b] of each row's forward output."""
    rows = jnp.arange(nodes.shape[0])
    if self.heads is None:
      return out.future_logits[rows, nodes]
    return self.heads.apply({'params': params.drafter}, out.hidden[rows, nodes][:, None])[:, 0]

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    return self._read(params, prefill, prompt_lengths - 1), jnp.zeros((), jnp.int32)

  def propose(self, params, head_logits, state, key):
    spec, vocab = self.config.tree, self.model.config.vocab_size
    rows = jnp.arange(state.tokens.shape[0])
    width = int(spec.ranks.max()) + 1
    if not self.needs_key:  # Each head's top-k: deterministic candidates.
      masked = mask_padded_vocab(head_logits, vocab)
      ranked = jax.lax.top_k(masked[:, :spec.depth], width)[1]                 # [B, D, R]
      tokens = trees.from_ranked(spec, ranked, state.tokens[rows, state.lengths - 1])
      return Proposal.static_tree(spec, tokens), head_logits, jnp.zeros((), jnp.int32)
    # Head d's candidates drawn in order without replacement from its processed
    # distribution; a node of depth d draws its children from head d (rank r: the r-th
    # draw), so every node of depth d < D gets head d's whole list as its candidates
    # (a sparse tree's skipped ranks may still be accepted, as the next token).
    q = log_probs(head_logits[:, :spec.depth], self.config.sampling, vocab)       # [B, D, V]
    ranked = sample_without_replacement(key, q, width)                           # [B, D, R]
    tokens = trees.from_ranked(spec, ranked, state.tokens[rows, state.lengths - 1])
    node_depth = np.minimum(spec.depths, spec.depth - 1)
    inner = jnp.asarray(spec.depths < spec.depth)[None, :, None]
    candidates = jnp.where(inner, ranked[:, node_depth], -1)
    return (Proposal.static_tree(spec, tokens, q[:, node_depth], candidates), head_logits,
            jnp.zeros((), jnp.int32))

  def observe(self, params, head_logits, state, verified, path, num_accepted):
    rows = jnp.arange(path.shape[0])
    return self._read(params, verified, path[rows, num_accepted])
