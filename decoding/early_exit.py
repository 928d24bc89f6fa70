"""CALM early exit (LOSSY): each row's token leaves the model at the first exit whose
confidence passes a threshold (Schuster et al. 2022, "Confident Adaptive Language
Modeling", sections 3-4), on an early-exit model (family early_exit, configs/early_exit.py:
exit heads at config.exit_layers sharing the final norm and unembedding).

Axis letters: B batch, S cache slots (= token buffer), L blocks, D model dim, V padded
vocabulary.

Per step (one token per row; the driver's buffer, prefill, commit and stop rule): the
blocks run ONE AT A TIME in a `lax.while_loop` over the layer index. After block E - 1
for an exit E, each row still running measures its confidence c at that exit and exits
when c >= threshold (its token is the exit head's argmax, or a draw from it under
sampling); a row that reaches the last block takes the full model's token. The layer
loop stops as soon as every row has exited (finished rows count as exited).

Confidence measures (CALM section 3.5), each in [0, 1):
  softmax     the exit distribution's largest probability;
  top2        the difference of its two largest probabilities (CALM's "softmax response");
  state       hidden-state saturation: cosine between this exit's residual state and the
              previous exit's (the token's embedding before the first exit), clipped at 0;
  classifier  CALM's trained early-exit classifier, sigmoid(w . h + b) on the exit's
              normalised state (trained with the model: training/objectives/early_exit.py).
softmax and top2 need the exit's logits (the LM head, as costly as several blocks on a
large vocabulary); state and classifier compute logits only when some row exits.
c is clipped below 1 so that threshold 1 never exits (the full model, token for token)
and threshold 0 always exits at the first exit. The paper's decaying threshold over
the sequence is not used: one threshold, calibrated by `launch.calibrate_exit`.

State propagation (CALM section 4.1): a row that exited at E copies its exit state h_E
up to every skipped block; the keys/values of blocks E .. L - 1 for its token are those
blocks' key/value projections of h_E, so later tokens attend to every layer. Blocks the
layer loop still runs for other rows take h_E as the exited row's input (their writes
for that row ARE the propagated keys/values); blocks after the loop stops get them from
`Transformer.propagate` (attention norm and key/value projections only).

Per-row exits with fixed shapes, and their cost: the whole batch runs each block
(masked inputs, no compaction of the rows still running), so a step costs the blocks
up to the LAST row's exit plus the propagation of the rest. Batch 1 saves every block
after the exit; at batch B the saving is that of the slowest row, smaller as B grows.
The alternatives cost more: a per-row gather into a compacted batch needs dynamic shapes,
and a `lax.switch` over layer groups copies the KV cache in and out of each branch (see
decoding/driver._verify_call). Layer-by-layer looping also reads each block's parameters
by a dynamic index (what the layer-skipping forward already does).

    out = driver.generate(model, params, prompts, lengths,
                          EarlyExitConfig(max_new_tokens=64, cache_capacity=128,
                                          threshold=0.9, confidence='softmax'), rng)
    out.stats['exit_histogram']   # [n + 1] row-tokens per exit, the last = full model
"""
import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decoding import driver
from decoding.sampling import mask_padded_vocab, sample

MEASURES = ('softmax', 'top2', 'state', 'classifier')
DEFAULT_THRESHOLD = 0.9   # when neither --exit_threshold nor a calibration gives one
# Where launch.calibrate_exit writes its thresholds, in the model's workdir.
CALIBRATION_FILE = 'exit_threshold.json'
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


@dataclasses.dataclass(frozen=True)
class EarlyExitConfig(driver.DecodeConfig):
  """Static settings: the driver's plus threshold (lambda in [0, 1]; 1 = never exit),
  confidence (one of MEASURES) and exit_layers (the exits used, a subset of the model's;
  () = all of them)."""
  threshold: float = 0.9
  confidence: str = 'softmax'
  exit_layers: tuple[int, ...] = ()

  def __post_init__(self):
    check_threshold(self.threshold)
    if self.confidence not in MEASURES:
      raise ValueError(f'Unknown confidence measure {self.confidence!r}; expected one of '
                       f'{", ".join(MEASURES)}.')

  @property
  def exact(self) -> bool:
    return False  # A token may come from an exit head: LOSSY.

  def generate_own(self, model, params, prompts, prompt_lengths, rng):
    return generate(model, params, prompts, prompt_lengths, self, rng)


def calibration_key(measure: str, exit_layers: str = '') -> str:
  """The calibration file's key of a confidence measure and an --exit_layers value."""
  return f'{measure}:{exit_layers or "all"}'


def load_calibration(workdir: str, measure: str, exit_layers: str = '') -> Optional[dict]:
  """The entry launch.calibrate_exit wrote for (measure, exit_layers) in `workdir`
  ({'threshold', 'target_agreement', ...}), or None."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get(calibration_key(measure, exit_layers))


def check_threshold(threshold: float) -> None:
  """Raises ValueError unless 0 <= threshold <= 1."""
  if not 0 <= threshold <= 1:
    raise ValueError(f'threshold={threshold} is outside [0, 1] (1 = never exit).')


def check_model(model, exit_layers=()) -> tuple[int, ...]:
  """The exits to use on `model`: exit_layers (or all the model's exits when empty).
  Raises ValueError for a model without exit heads, an exit outside [1, L) or one the
  model has no head at."""
  config = getattr(model, 'config', None)
  own = tuple(getattr(config, 'exit_layers', ()))
  if not own:
    raise ValueError('--method=early_exit needs a model with exit heads (trained with '
                     'configs/early_exit.py); this model has none.')
  num_layers = config.num_layers
  exits = tuple(sorted(set(exit_layers))) or own
  for e in exits:
    if not 1 <= e < num_layers:
      raise ValueError(f'exit layer {e} is outside [1, {num_layers}) for this '
                       f'{num_layers}-layer model.')
    if e not in own:
      raise ValueError(f'Exit layer {e} has no exit head (this model\'s exits: '
                       f'{", ".join(map(str, own))}).')
  return exits


def confidence(measure: str, logits, hidden, previous, classifier) -> jax.Array:
  """CALM's confidence of each row at one exit, clipped to [0, 1): logits [B, V] (masked
  padded ids), hidden / previous [B, D] this exit's and the previous exit's residual
  states, classifier [B] the trained classifier's output. Unused arguments may be None."""
  if measure == 'softmax':
    c = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  elif measure == 'top2':
    top = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 2)[0]
    c = top[:, 0] - top[:, 1]
  elif measure == 'state':
    h, p = hidden.astype(jnp.float32), previous.astype(jnp.float32)
    c = jnp.sum(h * p, -1) / jnp.maximum(jnp.linalg.norm(h, axis=-1)
                                          * jnp.linalg.norm(p, axis=-1), 1e-12)
  else:
    c = classifier
  return jnp.clip(c, 0.0, _BELOW_ONE)


def step(model, params, config: EarlyExitConfig, exits: tuple[int, ...], tokens, positions,
         cache, done, key):
  """One CALM token for every row. tokens, positions: [B] the last committed token and its
  position (= its cache slot); cache: holds slots < positions; done: [B] bool (finished
  rows count as exited); key: the step's random key (sampling).

  Returns (next tokens [B] int32, exit layer [B] int32 (E, or L for the full model),
  the cache with every layer of this token written at its slot (lengths unchanged), the
  blocks the batch ran []).
  """
  c = model.config
  num_layers, vocab = c.num_layers, c.vocab_size
  batch = tokens.shape[0]
  apply = lambda *a, **kw: model.apply({'params': params}, *a, **kw)
  kind = type(model)
  measure, threshold = config.confidence, config.threshold
  # exit_index[l]: the model's exit head after block l - 1 (an index into its
  # exit_layers), -1 where this config does not exit.
  table = np.full(num_layers + 1, -1, np.int32)
  for e in exits:
    table[e] = c.exit_layers.index(e)
  table = jnp.asarray(table)
  slots, pos = positions[:, None], positions[:, None]

  def choose(logits):
    return sample(key, logits, config.sampling, vocab).astype(jnp.int32)

  def head_logits(normed):
    return mask_padded_vocab(apply(normed, method=kind.logits)[:, 0], vocab)

  def at_exit(index, h, previous, running):
    """-> (confidence [B], the exit's token [B]) of each row at exit model index `index`."""
    normed = apply(h, index, method=kind.exit_hidden)                       # [B, 1, D]
    if measure in ('softmax', 'top2'):
      logits = head_logits(normed)
      return confidence(measure, logits, None, None, None), choose(logits)
    classifier = apply(normed[:, 0], method=kind.exit_confidence) if measure == 'classifier' \
        else None
    conf = confidence(measure, None, h[:, 0], previous[:, 0], classifier)
    token = jax.lax.cond(jnp.any(running & (conf >= threshold)),
                         lambda: choose(head_logits(normed)),
                         lambda: jnp.zeros((batch,), jnp.int32))
    return conf, token

  def body(carry):
    layer, h, previous, exit_h, exited, exit_at, token, cache = carry
    inputs = jnp.where(exited[:, None, None], exit_h, h)
    h, cache, _ = apply(inputs, pos, None, cache, slots, layer_ids=layer[None],
                        method=kind.blocks)
    index = table[layer + 1]
    conf, candidate = jax.lax.cond(
        index >= 0, lambda: at_exit(index, h, previous, ~exited),
        lambda: (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)))
    newly = ~exited & (index >= 0) & (conf >= threshold)
    return (layer + 1, h, jnp.where(index >= 0, h, previous),
            jnp.where(newly[:, None, None], h, exit_h), exited | newly,
            jnp.where(newly, layer + 1, exit_at), jnp.where(newly, candidate, token), cache)

  x = apply(tokens[:, None], method=kind.embed)                              # [B, 1, D]
  zeros_b = jnp.zeros((batch,), jnp.int32)
  carry = (jnp.zeros((), jnp.int32), x, x, x, done, zeros_b + num_layers, zeros_b, cache)
  layer, h, _, exit_h, exited, exit_at, token, cache = jax.lax.while_loop(
      lambda s: (s[0] < num_layers) & ~jnp.all(s[4]), body, carry)
  # Rows that ran every block: the full model's token (skipped when none did).
  final = jax.lax.cond(jnp.any(~exited),
                       lambda: choose(apply(h, method=kind.head)[:, 0]), lambda: zeros_b)
  token = jnp.where(exited, token, final)
  cache = apply(exit_h, pos, cache, slots, layer, method=kind.propagate)
  return token, exit_at, cache, layer


def generate(model, params, prompts, prompt_lengths, config: EarlyExitConfig,
             rng) -> driver.Output:
  """CALM decoding of right-padded prompts [B, P] (lengths [B]) with `config`; the
  prefill and the first token are the full model's. One `lax.while_loop` over steps,
  each one `step`. Returns driver.Output whose stats hold exit_histogram [n + 1]
  (row-tokens that left at each exit of `exits`, the last entry the full model),
  blocks_run [] (blocks the batch ran, summed over steps) and steps [].
  Raises ValueError (while tracing) as check_model does."""
  exits = check_model(model, config.exit_layers)
  num_layers = model.config.num_layers
  state, _ = driver.prefill(model, params, prompts, prompt_lengths, config,
                            config.cache_capacity, rng, max_depth=len(exits))
  ends = jnp.asarray(exits + (num_layers,))

  def round_(carry):
    state, blocks = carry
    rows = jnp.arange(state.tokens.shape[0])
    last, positions = state.tokens[rows, state.lengths - 1], state.lengths - 1
    rng, key = jax.random.split(state.rng)
    token, exit_at, cache, run = step(model, params, config, exits, last, positions,
                                      state.target_cache, state.done, key)
    old = state.target_cache.lengths
    state = state.replace(
        target_cache=cache.keep(jnp.where(state.done, old, old + 1)), rng=rng,
        target_calls=state.target_calls + 1,
        histogram=state.histogram.at[jnp.searchsorted(ends, exit_at)].add(
            (~state.done).astype(jnp.int32)))
    state = driver.commit_state(state, token[:, None], jnp.ones_like(last), config.eos_ids)
    return state, blocks + run

  state, blocks = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done), round_,
                                     (state, jnp.zeros((), jnp.int32)))
  finish, stop_id = driver.finish_reasons(state.tokens, state.lengths, prompt_lengths,
                                          config.max_new_tokens, config.eos_ids)
  return driver.Output(tokens=state.tokens, lengths=state.lengths, prompt_lengths=prompt_lengths,
                       target_calls=state.target_calls,
                       stats={'exit_histogram': state.histogram, 'blocks_run': blocks,
                              'steps': state.target_calls - 1,
                              'prefill_calls': jnp.int32(driver.prefill_calls(
                                  model.config, prompts.shape[1], config.prefill_chunk))},
                       finish=finish, stop_id=stop_id)
