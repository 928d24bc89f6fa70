"""TiDAR decoding (Liu et al. 2025, "TiDAR: Think in Diffusion, Talk in Autoregression",
section 3.3): one model (models.TidarLM), one forward per round that both verifies the
previous round's drafted block autoregressively and drafts the next block by diffusion.

Each round (the driver's one speculative round, decoding/driver.py; `score` makes the
round's single model call, so no other call exists: tokens per forward = tau):

  1. propose: the k = block_size - 1 drafts d_1..d_k of the previous round's call for
     the outcome that happened, drawn i.i.d. from the model's per-position diffusion
     marginals q_j (processed like sampling: greedy = their argmax, else temperature
     and filters), as a chain after the root (the last committed token);
  2. one call on root, d_1..d_k (causal: the AR part; its logits are the model's own
     next-token distributions p after each drafted prefix) followed by k + 1 blocks of
     k + 1 mask tokens, block i conditioned on the prefix, root and d_1..d_i
     (masks.tidar_round_mask): the next round's draft for each number i of drafts the
     verifier may accept ("pre-drafting all outcomes", the paper's figure 3);
  3. verify.accept (block verification by default, or token-level rejection sampling)
     accepts n drafts and draws the next token y from p (bonus) or the residual: the
     output is distributed exactly as the model's own autoregressive sampling (every
     draft distribution q_j is known and independent of the earlier drafts, a valid
     proposal for both rules); greedy output equals greedy AR decoding;
  4. observe keeps block n's marginals at its slots 1..k (slot 0 stands where y goes,
     which the AR part decides) as the next round's q.
The first round has no draft yet (num_drafted 0): it commits one token and drafts.
The next draft is conditioned on the accepted drafts but not on y (it is computed in
the same forward that decides y), as in the paper.

Cache: root and drafts are written at slots root .. root + k (the accepted ones stay:
the driver keeps lengths + n), the mask blocks at the slots after them, never kept;
the method reserves (k + 1) + (k + 1)^2 slots past the buffer.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp

from decoding import driver
from decoding.proposal import Proposal, Proposer
from decoding.sampling import log_probs
from models import TidarLM, masks


def check_model(model) -> None:
  """Raises ValueError unless `model` is a TiDAR model (configs/tidar.py)."""
  if not isinstance(model, TidarLM):
    raise ValueError('The tidar method decodes a TiDAR model (one model trained with the AR '
                     'and the block diffusion loss: configs/tidar.py); this is a '
                     f'{type(model).__name__}.')


@dataclasses.dataclass(frozen=True)
class TidarConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  # k: drafts per round, at most the model's block_size - 1 (its block holds the next
  # token's slot and k drafts); 0 = block_size - 1, the block it was trained for.
  num_draft: int = 0
  chain_rule: str = 'block'

  def __post_init__(self):
    if self.num_draft < 0:
      raise ValueError(f'num_draft must be >= 1 (or 0: the block size - 1), got '
                       f'{self.num_draft}.')

  def drafts(self, model) -> int:
    """k for `model`. Raises ValueError when num_draft does not fit its block."""
    most = model.block_size - 1
    if self.num_draft > most:
      raise ValueError(f'num_draft={self.num_draft} does not fit this TiDAR model\'s block '
                       f'of {model.block_size} (at most {most} drafts).')
    return self.num_draft or most

  def proposer(self, model, drafter) -> 'TidarProposer':
    del drafter
    check_model(model)
    return TidarProposer(self, model)


@flax.struct.dataclass
class TidarState:
  draft_logp: jax.Array    # [B, k, V] the processed diffusion marginals of the next draft
  ready: jax.Array         # [B] bool: a draft exists (false before the first round)


class TidarProposer(Proposer):
  """Drafts from the previous call's diffusion block; `score` is the round's one call."""
  needs_key = True

  def __init__(self, config: TidarConfig, model: TidarLM):
    self.config, self.model = config, model
    self.k = config.drafts(model)
    self.max_depth = self.k
    self.cache_slots = (self.k + 1) * (self.k + 2)

  def start(self, params, prefill, prompts, prompt_lengths, cache_size):
    batch = prompts.shape[0]
    width = prefill.logits.shape[-1]
    return (TidarState(draft_logp=jnp.zeros((batch, self.k, width), jnp.float32),
                       ready=jnp.zeros((batch,), bool)), jnp.zeros((), jnp.int32))

  def propose(self, params, state: TidarState, loop_state, key):
    rows = jnp.arange(loop_state.tokens.shape[0])
    root = loop_state.tokens[rows, loop_state.lengths - 1]
    drafted = jax.random.categorical(key, state.draft_logp, axis=-1).astype(jnp.int32)
    draft_logp = jnp.pad(state.draft_logp, ((0, 0), (0, 1), (0, 0)))      # [B, k + 1, V]
    num_drafted = jnp.where(state.ready, self.k, 0).astype(jnp.int32)
    return (Proposal.chain(root, drafted, draft_logp, num_drafted), state,
            jnp.zeros((), jnp.int32))

  def score(self, model, params, proposal, positions, cache, state):
    """The causal part (root and drafts) and the k + 1 mask blocks in one call.
    Returns the ForwardOutput of the causal part (logits [B, k + 1, V], hidden, the
    cache) with future_logits [B, k + 1, k, V]: block i's logits at its slots 1..k, the
    draft should i drafts be accepted (as a multi-token model's heads 2.. of node i)."""
    k1 = self.k + 1
    batch = proposal.tokens.shape[0]
    root = positions[:, 0]                  # a chain's root: position = slot = lengths - 1
    outcome = jnp.repeat(jnp.arange(k1), k1)[None]                          # [1, k1^2]
    offset = jnp.tile(jnp.arange(k1), k1)[None]
    tokens = jnp.concatenate(
        [proposal.tokens, jnp.full((batch, k1 * k1), model.mask_id, jnp.int32)], axis=1)
    all_positions = jnp.concatenate([positions, root[:, None] + 1 + outcome + offset], axis=1)
    slots = root[:, None] + jnp.arange(k1 + k1 * k1)[None]
    out = model.apply({'params': params.target}, tokens, all_positions,
                      masks.tidar_round_mask(root, self.k, cache.capacity), cache,
                      write_slots=slots)
    blocks = out.logits[:, k1:].reshape(batch, k1, k1, -1)
    return out.replace(logits=out.logits[:, :k1], hidden=out.hidden[:, :k1],
                       future_logits=blocks[:, :, 1:])

  def observe(self, params, state, loop_state, verified, path, num_accepted):
    rows = jnp.arange(num_accepted.shape[0])
    logits = verified.future_logits[rows, num_accepted]                    # [B, k, V]
    draft_logp = log_probs(logits, self.config.sampling, self.model.config.vocab_size)
    return TidarState(draft_logp=draft_logp, ready=jnp.ones_like(state.ready))
