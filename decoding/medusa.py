"""Medusa decoding (Cai et al. 2024): draft heads on the target's own hidden state;
and multi-token prediction self-speculation (Gloeckle et al. 2024), the same loop with
the heads built into the model (heads=None: the model's future_logits, head i + 1
predicting token t + i + 1, draft depth i).

Each round of one `lax.while_loop`:
  1. candidates: a node at depth d of rank r among its siblings takes head d's r-th
     best token, in a static tree: a TreeSpec (branching b_1 .. b_D, the Cartesian
     product of the heads' top-b_d) or a SparseTree (any shape, e.g. tuned on
     validation data by launch.tune_tree, as Medusa builds its trees); D <= heads;
  2. the target scores the whole tree in one call (tree mask, tree positions);
  3. `verify.tree_accept` walks it. The children of a node are distinct tokens chosen
     deterministically, so the rule is the point-mass one: lossless under greedy and
     under sampling. `typical=True` swaps in Medusa's typical acceptance (LOSSY);
  4. the heads read the target's hidden state at the last accepted node (the one whose
     logits gave the next token) and propose the next round's tree.
The first round's heads come from the prefill's hidden state at the prompt's end.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from decoding import base, speculative, trees, verify
from decoding.sampling import SamplingConfig, log_probs
from models import KVCache


# The tree when none is given and the heads have no tuned one (launch.tune_tree):
# most width where the first head is unsure, as the heads' accuracy falls with depth.
DEFAULT_TREE = (4, 2, 2)


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  max_new_tokens: int
  cache_capacity: int
  tree: trees.TreeSpec | trees.SparseTree = trees.TreeSpec(DEFAULT_TREE)
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = (2,)
  typical: bool = False          # LOSSY typical acceptance instead of the exact rule
  typical_epsilon: float = 0.09  # Medusa's posterior threshold
  typical_delta: float = 0.3     # Medusa's posterior alpha (its default: sqrt(epsilon))

  @property
  def max_accepted(self) -> int:
    return self.tree.depth


@flax.struct.dataclass
class State:
  tokens: jax.Array        # [B, S] int32 buffer: prompt then committed tokens
  lengths: jax.Array       # [B] int32
  limits: jax.Array        # [B] int32
  target_cache: KVCache    # holds tokens[:, :lengths - 1]
  done: jax.Array          # [B] bool
  rng: jax.Array
  target_calls: jax.Array  # [] int32
  histogram: jax.Array     # [D + 1] int32 row-rounds by accepted depth
  head_logits: jax.Array   # [B, K, V] heads at the last accepted node: tokens after the root


def candidates(spec, head_logits: jax.Array, root_token: jax.Array, vocab: int) -> jax.Array:
  """[B, N] node tokens: the root, then node i takes head (depth_i - 1)'s token of rank
  rank_i (a TreeSpec or SparseTree). head_logits: [B, K, V]; root_token: [B]."""
  masked = jnp.where(jnp.arange(head_logits.shape[-1]) < vocab, head_logits, -jnp.inf)
  top = jax.lax.top_k(masked[:, :spec.depth], int(spec.ranks.max()) + 1)[1]  # [B, D, R]
  nodes = top[:, spec.depths[1:] - 1, spec.ranks[1:]].astype(jnp.int32)       # [B, N - 1]
  return jnp.concatenate([root_token[:, None].astype(jnp.int32), nodes], axis=1)


@functools.partial(jax.jit, static_argnames=('model', 'heads', 'config'))
def generate(model, params, heads, heads_params, prompts: jax.Array, prompt_lengths: jax.Array,
             config: MedusaConfig, rng: jax.Array) -> base.Output:
  """Medusa decoding of right-padded prompts [B, P] with lengths [B].

  model: the target (models.Transformer); heads: models.MedusaHeads on its hidden states,
  or None for a multi-token prediction model's own heads (heads_params unused).
  """
  spec = config.tree
  num_heads = model.config.mtp_heads - 1 if heads is None else heads.num_heads
  if spec.depth > num_heads:
    raise ValueError(f'The tree is {spec.depth} deep but there are only {num_heads} '
                     'draft heads.')

  def read_heads(out, nodes):
    """[B, K, V] the heads' logits at node nodes[b] of each row's forward output."""
    if heads is None:
      return out.future_logits[rows, nodes]
    return heads.apply({'params': heads_params}, out.hidden[rows, nodes][:, None])[:, 0]

  batch, prompt_len = prompts.shape
  capacity, vocab = config.cache_capacity, model.config.vocab_size
  cache_size = capacity + spec.num_nodes
  rows = jnp.arange(batch)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  out = model.apply({'params': params}, prompts, positions,
                    cache=KVCache.empty(model.config, batch, cache_size))
  last = prompt_lengths - 1
  rng, key = jax.random.split(rng)
  first = jax.random.categorical(key, log_probs(out.logits[rows, last], config.sampling, vocab))
  head_logits = read_heads(out, last)
  state = State(tokens=base.token_buffer(prompts, prompt_lengths, capacity),
                lengths=prompt_lengths,
                limits=base.row_limits(prompt_lengths, config.max_new_tokens, capacity),
                target_cache=out.cache.replace(lengths=prompt_lengths),
                done=jnp.zeros((batch,), bool), rng=rng, target_calls=jnp.ones((), jnp.int32),
                histogram=jnp.zeros((spec.depth + 1,), jnp.int32), head_logits=head_logits)
  tokens, lengths, done = base.commit(state.tokens, state.lengths, state.limits, state.done,
                                      first.astype(jnp.int32)[:, None],
                                      jnp.ones((batch,), jnp.int32), config.eos_ids)
  state = state.replace(tokens=tokens, lengths=lengths, done=done)

  def round_(state: State) -> State:
    rng, key = jax.random.split(state.rng)
    root = state.lengths - 1
    node_tokens = candidates(spec, state.head_logits, state.tokens[rows, root], vocab)
    out = model.apply({'params': params}, node_tokens,
                      root[:, None] + jnp.asarray(spec.depths)[None],
                      trees.tree_mask(spec.ancestors, root, cache_size), state.target_cache)
    target_logp = log_probs(out.logits, config.sampling, vocab)             # [B, N, V]
    path, num_accepted, next_token = verify.tree_accept(
        key, node_tokens, spec.parents, target_logp, spec.depth, spec.max_children,
        greedy=config.sampling.greedy,
        typical=(config.typical_epsilon, config.typical_delta) if config.typical else None)
    head_logits = read_heads(out, path[rows, num_accepted])
    source, target = trees.path_slots(root, path, num_accepted, cache_size)
    return speculative.finish_round(
        state, node_tokens[rows[:, None], path[:, 1:]], num_accepted, next_token,
        out.cache.move_slots(source, target), config.eos_ids, rng=rng,
        head_logits=head_logits)

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
  return base.Output(tokens=state.tokens, lengths=state.lengths, prompt_lengths=prompt_lengths,
                     target_calls=state.target_calls,
                     stats={'draft_calls': jnp.zeros((), jnp.int32),
                            'accepted_histogram': state.histogram})
