"""EAGLE decoding (Li et al. 2024) with EAGLE-2 dynamic draft trees.

The drafter (models.EagleDrafter) works on the target's features f_t (its final hidden
state): drafter slot t holds the entry (f_t, x_{t+1}) and predicts f^_{t+1}, whose
logits under the target's LM head propose x_{t+2}. The EAGLE proposer for the round
driver (decoding/driver.py), each round:

  1. catch-up: the committed tokens whose target features the last verification
     produced are fed to the drafter, one window call of depth + 1 entries from its
     valid length (a round accepts at most `depth` tokens, so it is never further
     behind); the entry of the root token x_n, (f_{n-1}, x_n), predicts f^_n, whose
     logits rank the first level;
  2. expansion (EAGLE-2): trees.grow_dynamic_tree expands, level by level, the top_k
     nodes of highest cumulative draft log-probability; a node's entry reads its
     *parent's predicted feature* and its own token (feature-level autoregression),
     all top_k frontier nodes in one drafter call per level under a tree mask;
     reranking keeps the `budget` best nodes;
  3. the target scores the tree in one call; `verify.tree_accept` walks it: under
     greedy with the point-mass rule for distinct top-k children; under sampling the
     children are drawn without replacement and verified by recursive rejection
     sampling without replacement (tree_rule 'rrsw'), or are the top-k with the
     point-mass rule ('specinfer'); lossless either way;
  4. the target's features on the accepted path (root included) are kept for the next
     catch-up, and the accepted path's target KV moves into place.

Why features, not tokens: the paper's point is that the next feature is far more
predictable from features than the next token from tokens, and feeding the sampled
token's embedding resolves which branch of the sampling the drafter is on.

EAGLE-3 (Li et al. 2025) is the same proposer with an EAGLE-3 drafter
(models.EagleDrafter with feature_layers): the target features it keeps are the chosen
blocks' outputs, concatenated (the target's prefill and verification calls return
them: Proposer.needs_layer_hidden), which the drafter fuses at each catch-up; the
expansion feeds the drafter its own outputs exactly as above. Method `eagle3`.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp

from decoding import driver, speculative, trees, verify
from decoding.proposal import Proposal, Proposer
from models import KVCache, masks
from models.heads import target_features

# What a drafter must share with the target it decodes: the shapes its features, token
# embeddings and LM head come in (a drafter trained on another target is refused).
_TARGET_FIELDS = ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads',
                  'head_dim', 'mlp_dim', 'tie_embeddings')


def check_drafter(model, drafter) -> None:
  """Refuses an EAGLE / EAGLE-3 drafter trained on another target: its recorded target
  model (the drafter's config) must have the target's shapes. Raises a one-line
  ValueError naming each differing field."""
  differing = [f'{name} {getattr(drafter.config, name)} vs {getattr(model.config, name)}'
               for name in _TARGET_FIELDS
               if getattr(drafter.config, name) != getattr(model.config, name, None)]
  if differing:
    kind = 'EAGLE-3' if drafter.feature_layers else 'EAGLE'
    raise ValueError(f'The {kind} drafter was trained on another target (drafter\'s target '
                     f'vs this one: {", ".join(differing)}); train one for this target '
                     '(--config.target_workdir).')


@dataclasses.dataclass(frozen=True)
class EagleConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  # EAGLE-2's tree. The paper's 7B default is top_k 10, depth 6, 60 nodes; a small model
  # on CPU pays per verified node, so a smaller tree is the default here.
  tree: trees.DynamicTreeSpec = trees.DynamicTreeSpec(4, 5, 24)
  # Under sampling (verify.TREE_RULES): 'rrsw' draws each node's children without
  # replacement (recursive rejection sampling without replacement verifies them);
  # 'specinfer' takes the drafter's top-k (the point-mass rule).
  tree_rule: str = 'rrsw'

  def __post_init__(self):
    verify.check_tree_rule(self.tree_rule)
    if not isinstance(self.tree, trees.DynamicTreeSpec):
      raise ValueError('EAGLE drafts EAGLE-2 dynamic trees: give a trees.DynamicTreeSpec '
                       f'(spec "dynamic:TOP_K,DEPTH,BUDGET"), not {self.tree}.')

  @property
  def max_accepted(self) -> int:
    return self.tree.depth

  def proposer(self, model, drafter) -> 'EagleProposer':
    if drafter is None:
      raise ValueError('The eagle method needs an EAGLE drafter (--heads_workdir).')
    check_drafter(model, drafter)
    return EagleProposer(self, model, drafter)


@flax.struct.dataclass
class EagleState:
  cache: KVCache            # the drafter's one layer; true entries in slots < cache.lengths
  features: jax.Array       # [B, depth + 1, F] target features f_t for the drafter slots
                            # t = cache.lengths + j (the next catch-up's inputs); F = D,
                            # or k * D: an EAGLE-3 drafter's k target layers


class EagleProposer(Proposer):
  """models.EagleDrafter on the target's features, with the target's embedding and LM
  head (the target's parameters, params.target); an EAGLE-3 drafter reads the target's
  per-layer hidden states."""

  def __init__(self, config: EagleConfig, model, drafter):
    self.config, self.model, self.drafter = config, model, drafter
    self.max_depth, self.cache_slots = config.tree.depth, config.tree.cache_slots
    self.ranked_nodes = config.tree.budget
    self.needs_key = not config.sampling.greedy and config.tree_rule == 'rrsw'
    self.needs_layer_hidden = bool(drafter.feature_layers)

  def _draft(self, params, features, tokens, positions, mask, cache, write_slots=None):
    """The drafter on entries (features, tokens) -> (predicted features, cache)."""
    embedded = self.model.apply({'params': params.target}, tokens, method=self.model.embed)
    return self.drafter.apply({'params': params.drafter}, features, embedded, positions, mask,
                              cache, write_slots=write_slots)

  def _scores(self, params, features):
    """[B, T, D] predicted features -> [B, T, vocab] ranking log-probs."""
    logits = self.model.apply({'params': params.target}, features, method=self.model.logits)
    return speculative.draft_scores(logits, self.config.sampling, self.model.config.vocab_size)

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    """The drafter's prefill: entries (f_t, x_{t+1}) for t < P - 1 (each row keeps its
    first prompt_length - 1; the rest are overwritten by the first catch-up)."""
    batch, prompt_len = prompts.shape
    rows, last = jnp.arange(batch), prompt_lengths - 1
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    next_tokens = jnp.pad(prompts[:, 1:], ((0, 0), (0, 1)))
    prompt_features = target_features(self.drafter, prefill)                  # [B, P, F]
    _, cache = self._draft(params, prompt_features, next_tokens, positions, None,
                           KVCache.empty(self.drafter.layer_config, batch, cache_size))
    features = jnp.zeros((batch, self.config.tree.depth + 1, prompt_features.shape[-1]),
                         prompt_features.dtype)
    return (EagleState(cache=cache.keep(last),
                       features=features.at[:, 0].set(prompt_features[rows, last])),
            jnp.ones((), jnp.int32))

  def propose(self, params, eagle: EagleState, state, key):
    spec = self.config.tree
    rows, root = jnp.arange(state.tokens.shape[0]), state.lengths - 1  # root: target slot
    start, width = eagle.cache.lengths, spec.depth + 1   # first drafter slot to (re)write
    # 1. Catch-up: entries t = start .. start + depth; those past the root's entry
    # (slot root - 1) are junk the expansion overwrites or the tree mask hides.
    window = start[:, None] + jnp.arange(width)[None]                          # [B, W]
    window_tokens = state.tokens[rows[:, None], jnp.minimum(window + 1, state.tokens.shape[1] - 1)]
    predicted, cache = self._draft(params, eagle.features, window_tokens, window, None,
                                   eagle.cache)
    root_entry = jnp.clip(root - 1 - start, 0, width - 1)  # (done rows: any index will do)
    root_feature = predicted[rows, root_entry]                                  # [B, D]

    # 2. Expansion. The drafter's tree root is the root token's entry, slot root - 1;
    # a node of depth d is the entry (f^ of its parent, its token) at position root - 1 + d.
    def expand(carry, level, node_tokens, ancestors, parent):
      cache, fed_features = carry                 # fed_features: [B, k', D] last feed's
      parent_features = jnp.take_along_axis(fed_features, parent[:, :, None], axis=1)
      slots = root + (level - 1) * spec.top_k
      new_features, cache = self._draft(
          params, parent_features, node_tokens,
          jnp.broadcast_to((root - 1 + level)[:, None], node_tokens.shape),
          masks.tree_mask(ancestors, root - 1, cache.capacity), cache,
          write_slots=slots[:, None] + jnp.arange(node_tokens.shape[1])[None])
      return (cache, new_features), self._scores(params, new_features)

    (cache, _), node_tokens, parents, depths, ranks, *drawn = trees.grow_dynamic_tree(
        spec, state.tokens[rows, root], self._scores(params, root_feature[:, None])[:, 0],
        expand, (cache, root_feature[:, None]), key if self.needs_key else None)
    if drawn:  # The drafter's distributions on the target's (padded) vocabulary axis.
      config = self.model.config
      drawn[0] = speculative.pad_vocab(
          drawn[0], getattr(config, 'padded_vocab_size', config.vocab_size))
    return (Proposal.dynamic_tree(spec, node_tokens, parents, depths, *drawn, ranks=ranks),
            eagle.replace(cache=cache), jnp.asarray(spec.depth, jnp.int32))

  def observe(self, params, eagle: EagleState, state, verified, path, num_accepted):
    """The drafter keeps its true entries (slots < root); the target's features on the
    accepted path, root first, are the next catch-up's inputs for slots root, root + 1..."""
    rows = jnp.arange(path.shape[0])
    features = target_features(self.drafter, verified)
    return EagleState(cache=eagle.cache.keep(state.lengths - 1),
                      features=features[rows[:, None], path].astype(eagle.features.dtype))
