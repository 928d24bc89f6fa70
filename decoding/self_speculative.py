"""Self-speculative decoding: the target drafts for itself with some of its blocks skipped.

The draft is the target model with a set of blocks skipped: any set (Draft & Verify,
Zhang et al. 2024, "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding", section 3; SWIFT, Xia et al. 2025) or every block from E on,
i.e. the first E blocks (LayerSkip's early-exit draft, Elhoushi et al. 2024, section 4).
A skipped block passes the residual stream through; the final norm and the LM head are
the model's own (models.Transformer.__call__(layers=...)); on an early-exit model
(family early_exit, trained with LayerSkip's recipe: configs/early_exit.py) an exit-layer
draft uses that exit's head, LayerSkip's trained self-speculation. It needs no training and
works on any imported plain LM; `launch.skip_search` chooses a skip set on calibration
text by measured acceptance.

Each round (the driver's one speculative round, decoding/driver.py):
  1. the draft feeds the root and drafts K tokens one at a time (greedy: its argmax;
     sampling: i.i.d. from its processed distribution q), writing its keys/values into
     the TARGET's cache at the slots the verify call writes next (root .. root + K);
  2. the target scores root + K drafted tokens in one call; the chain rule of
     decoding/verify.py (token-level rejection sampling; greedy match) accepts a prefix:
     lossless, greedy and sampling.

Cache (one cache, no second one): the draft reads the target's own keys/values of the
committed context at every block it runs (Draft & Verify's choice: the context's full-
model KV are at least as good as the draft's own, and no second cache is filled or
kept), and its writes at slots >= root never outlive the round. The first `shared`
blocks (every block before the first skipped one; all E blocks of an exit-layer draft)
see exactly the inputs the target's own blocks see, so the keys/values the draft writes
there for the root and the drafted tokens ARE the target's: the verify call reuses them
and runs only blocks shared .. L - 1 on the draft's hidden states at block `shared`
(LayerSkip's cache reuse, Elhoushi et al. 2024, section 4.3: its "KVQ cache"). For that
the draft also feeds its last drafted token through the shared blocks (not through the
rest, nor the head). The other blocks' slots the draft wrote are rewritten by the verify
call, so after the round the cache holds exactly what plain decoding writes (tested to
1e-6 in float32). With block 0 skipped nothing is shared and the verify call is the
whole model.
"""
import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from decoding import driver
from decoding.proposal import Proposal, Proposer
from decoding.sampling import log_probs

# Where launch.skip_search writes the chosen skip set, in the model's workdir.
SKIP_FILE = 'skip_layers.json'


def exit_skip(exit_layer: int, num_layers: int) -> tuple[int, ...]:
  """The skip set of an early-exit draft: blocks exit_layer .. num_layers - 1.
  Raises ValueError unless 1 <= exit_layer < num_layers."""
  if not 1 <= exit_layer < num_layers:
    raise ValueError(f'exit layer {exit_layer} is outside [1, {num_layers}) for this '
                     f'{num_layers}-layer model.')
  return tuple(range(exit_layer, num_layers))


def parse_skip(text: str, flag: str = 'skip_layers') -> tuple[int, ...]:
  """'3,5,9-11' -> (3, 5, 9, 10, 11). Raises ValueError (naming --flag) for anything else."""
  out = []
  try:
    for part in text.split(','):
      if '-' in part:
        first, last = (int(x) for x in part.split('-'))
        out += range(first, last + 1)
      else:
        out.append(int(part))
  except ValueError:
    raise ValueError(f'--{flag}={text!r}; expected block indices like "3,5,9-11".') \
        from None
  return tuple(out)


def check_skip(skip: tuple[int, ...], num_layers: Optional[int]) -> None:
  """Raises ValueError unless `skip` is a non-empty set of distinct block indices in
  [0, num_layers) that leaves at least one block to run (num_layers None: only >= 0)."""
  if not skip:
    raise ValueError('Self-speculation needs at least one skipped block (--skip_layers or '
                     '--exit_layer).')
  bad = [i for i in skip if i < 0 or (num_layers is not None and i >= num_layers)]
  if bad:
    raise ValueError(f'Skipped block {bad[0]} is outside [0, {num_layers}).')
  if len(set(skip)) != len(skip):
    raise ValueError(f'Skipped blocks {skip} repeat a block.')
  if num_layers is not None and len(skip) >= num_layers:
    raise ValueError(f'Skipping all {num_layers} blocks leaves no draft model.')


def load_skip_layers(workdir: str) -> Optional[dict]:
  """The skip set launch.skip_search wrote in `workdir` ({'skip_layers': [...], ...}),
  or None when there is none."""
  path = os.path.join(workdir, SKIP_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class SelfSpeculativeConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit)."""
  skip_layers: tuple[int, ...] = ()   # the blocks the draft skips (sorted on use)
  num_draft: int = 4                  # K: tokens drafted per round

  def __post_init__(self):
    if self.num_draft < 1:
      raise ValueError(f'num_draft must be >= 1, got {self.num_draft}.')
    check_skip(self.skip_layers, None)

  def proposer(self, model, drafter) -> 'SelfDraftProposer':
    del drafter
    return SelfDraftProposer(self, model)


class SelfDraftProposer(Proposer):
  """The target with `config.skip_layers` skipped drafts a chain into the target's own
  cache; the verify call reuses the first `shared` blocks' keys/values (module docstring).
  Its state across rounds is nothing; within a round, (the cache the draft wrote,
  [B, K + 1, D] the draft's hidden states at block `shared` for root + K drafted)."""
  needs_key = True

  def __init__(self, config: SelfSpeculativeConfig, model):
    num_layers = model.config.num_layers
    check_skip(config.skip_layers, num_layers)
    if getattr(model.config, 'mtp_heads', 1) > 1:
      raise ValueError('Self-speculation by layer skipping decodes a plain LM; this model '
                       'has multi-token prediction heads (use --method=mtp).')
    self.config, self.model = config, model
    self.keep = tuple(i for i in range(num_layers) if i not in config.skip_layers)
    self.shared = min(config.skip_layers)       # blocks 0 .. shared - 1 run in both
    self.max_depth = config.num_draft
    # LayerSkip's trained variant: an exit-layer draft of an early-exit model (family
    # early_exit) drafts with that exit's head (its own norm when the model has them).
    exits = getattr(model.config, 'exit_layers', ())
    self.exit_head = (self.shared if self.keep == tuple(range(self.shared))
                      and self.shared in exits else None)

  def _draft(self, params, tokens, positions, cache):
    """One draft call on [B] tokens at [B] positions (appended to `cache`) -> (logits
    [B, V], hidden at block `shared` [B, D] or None, cache)."""
    out = self.model.apply({'params': params}, tokens[:, None], positions[:, None],
                           cache=cache, return_layer_hidden=self.shared > 0, layers=self.keep,
                           exit_head=self.exit_head)
    hidden = out.layer_hidden[self.shared - 1][:, 0] if self.shared else None
    return out.logits[:, 0], hidden, out.cache

  def _shared_blocks(self, params, tokens, positions, cache):
    """Blocks 0 .. shared - 1 alone on [B] tokens (their keys/values written at the
    cache's append slots) -> ([B, D] block shared - 1's output, cache)."""
    model = self.model
    x = model.apply({'params': params}, tokens[:, None], method=type(model).embed)
    x, cache, _ = model.apply({'params': params}, x, positions[:, None], None, cache,
                              start=0, stop=self.shared, method=type(model).blocks)
    return x[:, 0], cache

  def propose(self, params, state, loop_state, key):
    del state
    config, target = self.config, params.target
    k, vocab = config.num_draft, self.model.config.vocab_size
    batch = loop_state.tokens.shape[0]
    rows, slot = jnp.arange(batch), loop_state.lengths - 1    # the root's slot = position
    root = loop_state.tokens[rows, slot]
    cache = loop_state.target_cache                             # lengths = slot
    logits, hidden, cache = self._draft(target, root, slot, cache)
    width = logits.shape[-1]
    hiddens = (None if hidden is None else
               jnp.zeros((batch, k + 1) + hidden.shape[1:], hidden.dtype).at[:, 0].set(hidden))
    tokens = jnp.zeros((batch, k), jnp.int32)
    logp = jnp.zeros((batch, k + 1, width), jnp.float32)

    def draw(i, logits, tokens, logp):
      q = log_probs(logits, config.sampling, vocab)                          # [B, V]
      token = jax.random.categorical(jax.random.fold_in(key, i), q).astype(jnp.int32)
      return token, tokens.at[:, i].set(token), logp.at[:, i].set(q)

    def body(i, carry):  # Draft token i and feed it (its logits propose token i + 1).
      logits, cache, tokens, logp, hiddens = carry
      token, tokens, logp = draw(i, logits, tokens, logp)
      logits, hidden, cache = self._draft(target, token, slot + 1 + i, cache)
      if hiddens is not None:
        hiddens = hiddens.at[:, i + 1].set(hidden)
      return logits, cache, tokens, logp, hiddens

    logits, cache, tokens, logp, hiddens = jax.lax.fori_loop(
        0, k - 1, body, (logits, cache, tokens, logp, hiddens))
    token, tokens, logp = draw(k - 1, logits, tokens, logp)
    calls = k
    if hiddens is not None:  # The last drafted token through the shared blocks only.
      hidden, cache = self._shared_blocks(target, token, slot + k, cache)
      hiddens = hiddens.at[:, k].set(hidden)
    cache = cache.keep(loop_state.target_cache.lengths)
    return Proposal.chain(root, tokens, logp), (cache, hiddens), jnp.asarray(calls, jnp.int32)

  def score(self, model, params, proposal, positions, cache, state):
    del cache  # The draft wrote into it: its version is `state`'s.
    cache, hiddens = state
    if hiddens is None:  # Block 0 skipped: nothing shared, the whole target.
      return model.apply({'params': params.target}, proposal.tokens, positions, None, cache)
    return model.apply({'params': params.target}, hiddens, positions, None, cache,
                       start=self.shared, method=type(model).resume)

  def observe(self, params, state, loop_state, verified, path, num_accepted):
    return None
