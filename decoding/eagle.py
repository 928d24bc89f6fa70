"""EAGLE decoding (Li et al. 2024) with EAGLE-2 dynamic draft trees.

The drafter (models.EagleDrafter) works on the target's features f_t (its final hidden
state): drafter slot t holds the entry (f_t, x_{t+1}) and predicts f^_{t+1}, whose
logits under the target's LM head propose x_{t+2}. Each round of one `lax.while_loop`:

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
  3. the target scores the tree in one call; `verify.tree_accept` walks it with the
     point-mass rule for distinct top-k children: lossless under greedy and sampling;
  4. the target's features on the accepted path (root included) are kept for the next
     catch-up, and the accepted path's target KV moves into place.

Why features, not tokens: the paper's point is that the next feature is far more
predictable from features than the next token from tokens, and feeding the sampled
token's embedding resolves which branch of the sampling the drafter is on.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from decoding import base, speculative, trees, verify
from decoding.sampling import SamplingConfig, log_probs
from models import KVCache


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  max_new_tokens: int
  cache_capacity: int
  # EAGLE-2's tree. The paper's 7B default is top_k 10, depth 6, 60 nodes; a small model
  # on CPU pays per verified node, so a smaller tree is the default here.
  tree: trees.DynamicTreeSpec = trees.DynamicTreeSpec(4, 5, 24)
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = (2,)

  def __post_init__(self):
    if not isinstance(self.tree, trees.DynamicTreeSpec):
      raise ValueError('EAGLE drafts EAGLE-2 dynamic trees: give a trees.DynamicTreeSpec '
                       f'(spec "dynamic:TOP_K,DEPTH,BUDGET"), not {self.tree}.')

  @property
  def max_accepted(self) -> int:
    return self.tree.depth


@flax.struct.dataclass
class State:
  tokens: jax.Array         # [B, S] int32 buffer: prompt then committed tokens
  lengths: jax.Array        # [B] int32
  limits: jax.Array         # [B] int32
  target_cache: KVCache     # holds tokens[:, :lengths - 1]
  drafter_cache: KVCache    # one layer; true entries in slots < drafter_cache.lengths
  features: jax.Array       # [B, depth + 1, D] target features f_t for the drafter slots
                            # t = drafter_cache.lengths + j (the next catch-up's inputs)
  done: jax.Array           # [B] bool
  rng: jax.Array
  target_calls: jax.Array   # [] int32
  draft_calls: jax.Array    # [] int32
  histogram: jax.Array      # [depth + 1] int32 row-rounds by accepted depth


@functools.partial(jax.jit, static_argnames=('model', 'drafter', 'config'))
def generate(model, params, drafter, drafter_params, prompts: jax.Array,
             prompt_lengths: jax.Array, config: EagleConfig, rng: jax.Array) -> base.Output:
  """EAGLE decoding of right-padded prompts [B, P] with lengths [B].

  model: the target (models.Transformer); drafter: models.EagleDrafter on its features,
  using the target's embedding and LM head.
  """
  spec, sampling = config.tree, config.sampling
  batch, prompt_len = prompts.shape
  capacity, vocab = config.cache_capacity, model.config.vocab_size
  k, width = spec.top_k, spec.depth + 1
  cache_size = capacity + spec.cache_slots
  rows = jnp.arange(batch)

  def draft(features, tokens, positions, mask, cache):
    """The drafter on entries (features, tokens) -> (predicted features, cache)."""
    embedded = model.apply({'params': params}, tokens, method=model.embed)
    return drafter.apply({'params': drafter_params}, features, embedded, positions, mask, cache)

  def scores(features):  # [B, T, D] predicted features -> [B, T, vocab] ranking log-probs
    logits = model.apply({'params': params}, features, method=model.logits)
    return speculative.draft_scores(logits, sampling, vocab)

  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  out = model.apply({'params': params}, prompts, positions,
                    cache=KVCache.empty(model.config, batch, cache_size))
  last = prompt_lengths - 1
  # The drafter's prefill: entries (f_t, x_{t+1}) for t < P - 1 (each row keeps its
  # first prompt_length - 1; the rest are overwritten by the first catch-up).
  next_tokens = jnp.pad(prompts[:, 1:], ((0, 0), (0, 1)))
  _, drafter_cache = draft(out.hidden, next_tokens, positions, None,
                           KVCache.empty(drafter.layer_config, batch, cache_size))
  features = jnp.zeros((batch, width, model.config.d_model), out.hidden.dtype)
  rng, key = jax.random.split(rng)
  first = jax.random.categorical(key, log_probs(out.logits[rows, last], sampling, vocab))
  state = State(tokens=base.token_buffer(prompts, prompt_lengths, capacity),
                lengths=prompt_lengths,
                limits=base.row_limits(prompt_lengths, config.max_new_tokens, capacity),
                target_cache=out.cache.replace(lengths=prompt_lengths),
                drafter_cache=drafter_cache.replace(lengths=last),
                features=features.at[:, 0].set(out.hidden[rows, last]),
                done=jnp.zeros((batch,), bool), rng=rng, target_calls=jnp.ones((), jnp.int32),
                draft_calls=jnp.ones((), jnp.int32),
                histogram=jnp.zeros((spec.depth + 1,), jnp.int32))
  tokens, lengths, done = base.commit(state.tokens, state.lengths, state.limits, state.done,
                                      first.astype(jnp.int32)[:, None],
                                      jnp.ones((batch,), jnp.int32), config.eos_ids)
  state = state.replace(tokens=tokens, lengths=lengths, done=done)

  def round_(state: State) -> State:
    rng, key = jax.random.split(state.rng)
    root = state.lengths - 1                  # the root token's slot in the target cache
    start = state.drafter_cache.lengths       # first drafter slot to (re)write
    # 1. Catch-up: entries t = start .. start + depth; those past the root's entry
    # (slot root - 1) are junk the expansion overwrites or the tree mask hides.
    window = start[:, None] + jnp.arange(width)[None]                         # [B, W]
    window_tokens = state.tokens[rows[:, None], jnp.minimum(window + 1, capacity - 1)]
    predicted, cache = draft(state.features, window_tokens, window, None, state.drafter_cache)
    root_entry = jnp.clip(root - 1 - start, 0, width - 1)  # (done rows: any index will do)
    root_feature = predicted[rows, root_entry]                                 # [B, D]

    # 2. Expansion. The drafter's tree root is the root token's entry, slot root - 1;
    # a node of depth d is the entry (f^ of its parent, its token) at position root - 1 + d.
    def expand(carry, level, node_tokens, ancestors, parent):
      cache, fed_features = carry                 # fed_features: [B, k', D] last feed's
      parent_features = jnp.take_along_axis(fed_features, parent[:, :, None], axis=1)
      new_features, cache = draft(
          parent_features, node_tokens,
          jnp.broadcast_to((root - 1 + level)[:, None], node_tokens.shape),
          trees.tree_mask(ancestors, root - 1, cache.capacity),
          cache.replace(lengths=root + (level - 1) * k))
      return (cache, new_features), scores(new_features)

    (cache, _), node_tokens, parents, depths = trees.grow_dynamic_tree(
        spec, state.tokens[rows, root], scores(root_feature[:, None])[:, 0], expand,
        (cache, root_feature[:, None]))

    # 3. Verification: the whole tree in one target call.
    ancestors = trees.ancestors_from_parents(parents, spec.depth)
    out = model.apply({'params': params}, node_tokens, root[:, None] + depths,
                      trees.tree_mask(ancestors, root, cache_size), state.target_cache)
    target_logp = log_probs(out.logits, sampling, vocab)                      # [B, N, V]
    path, num_accepted, next_token = verify.tree_accept(
        key, node_tokens, parents, target_logp, spec.depth, spec.max_children,
        greedy=sampling.greedy)

    # 4. The drafter keeps its true entries (slots < root); the target's features on the
    # accepted path, root first, are the next catch-up's inputs for slots root, root + 1, ...
    source, target = trees.path_slots(root, path, num_accepted, cache_size)
    return speculative.finish_round(
        state, node_tokens[rows[:, None], path[:, 1:]], num_accepted, next_token,
        out.cache.move_slots(source, target), config.eos_ids, rng=rng,
        drafter_cache=cache.replace(lengths=root),
        features=out.hidden[rows[:, None], path].astype(state.features.dtype),
        draft_calls=state.draft_calls + spec.depth)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  return base.Output(tokens=state.tokens, lengths=state.lengths, prompt_lengths=prompt_lengths,
                     target_calls=state.target_calls,
                     stats={'draft_calls': state.draft_calls,
                            'accepted_histogram': state.histogram})
