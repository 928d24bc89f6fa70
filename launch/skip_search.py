"""Training-free skip-set search for self-speculation (decoding/self_speculative.py):

  python -m launch.skip_search --workdir=WORKDIR [--max_skip=0.5] [--verify_cost=measured]

chooses which blocks the draft skips, by measured acceptance on calibration text, and
writes the choice to WORKDIR/skip_layers.json, which `launch.decode` and `launch.bench`
use for --method=self_speculative when no --skip_layers / --exit_layer is given.

Calibration text: the target's own greedy continuations of CALIBRATION_PROMPTS (chat
requests unlike the benchmark's prompts, so the choice is not fitted to what it is
measured on), or of --prompt_file. What is measured: the acceptance rate alpha of a skip
set, the fraction of continuation positions where the draft's greedy token equals the
target's. The draft's query at each position reads the target's keys/values for the
context before it and its own at itself, exactly as the first drafted token of a round
does (self_speculative drafts into the target's cache), so one cached forward of the
skipped model over the whole text measures it (`acceptance`).

The search (Draft & Verify, Zhang et al. 2024, section 3.2, chooses skip sets by
acceptance with Bayesian optimisation; SWIFT, Xia et al. 2025, by a matchness score on
the fly; we take a cheaper deterministic greedy, written down here): alpha of each block
skipped alone ranks the blocks; then skip sets grow one block at a time, trying the
`width` best-ranked blocks not yet skipped and keeping the one with the highest alpha.
Every set on that path and every draft length K in 1..max_draft is scored by predicted
speedup over plain decoding:

  tau(alpha, K) = (1 - alpha^(K + 1)) / (1 - alpha)   (Leviathan et al. 2023, eq. 1:
                                                        i.i.d. acceptance per token)
  cost = K * draft + c(K + 1) * (h + (1 - h) (L - shared) / L) + (1 - h) shared / L
  draft = h + (1 - h) kept / L

in plain decoding steps, where h is the LM head's share of a step's FLOPs (from the
parameter counts), `shared` the blocks before the first skipped one (their keys/values
the verify call reuses), and c(T) the verify-cost curve (measured on this machine,
decoding/cost_model.py; 'flat': c = 1, the memory-bound accelerator regime). The best
(set, K) is written with its alpha, predicted tau and speedup; then one real
self-speculative decode of the calibration prompts measures its tau.
"""
import json
import os
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The model workdir (launch.convert / train).')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'Calibration prompts (one per line, '
                                   'JSONL or Spec-Bench); default: CALIBRATION_PROMPTS.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 48, 'Greedy tokens continued per prompt.')
_MAX_SKIP = flags.DEFINE_float('max_skip', 0.5, 'The largest fraction of blocks skipped.')
_WIDTH = flags.DEFINE_integer('width', 3, 'Blocks tried per growth step.')
_MAX_DRAFT = flags.DEFINE_integer('max_draft', 8, 'The longest draft length K scored.')
_COST = flags.DEFINE_enum('verify_cost', 'measured', ['measured', 'flat'],
                          'c(T): measured on this machine, or 1 (accelerator-like).')
flags.mark_flags_as_required(['workdir'])

# Calibration requests (chat), unlike data/prompts/specbench_mini.jsonl's.
CALIBRATION_PROMPTS = (
    'Explain how a hash table handles collisions.',
    'Write a Python function that returns the n-th Fibonacci number.',
    'What are three tips for writing a clear email?',
    'Summarize the water cycle in a few sentences.',
    'Give me a short recipe for pancakes.',
    'Why is the sky blue?',
)


def acceptance_program(model):
  """-> jitted fn(params, tokens [B, S], lengths [B], starts [B], keep [n] int32) ->
  (alpha: agreeing positions [], counted positions []), for a skip set given by the kept
  blocks `keep` (traced: one compilation per n). Positions counted: t in
  [starts - 1, lengths - 1), the predictions of each row's continuation tokens.

  The target's prefill fills slots [0, S) of a 2S-slot cache; the skipped model writes
  its own keys/values at slot S + t and its query at t sees slots < t (the target's)
  and S + t (its own): the first drafted token of a self-speculative round, at every
  position in one call."""
  import jax
  import jax.numpy as jnp
  from models import KVCache

  def run(params, tokens, lengths, starts, keep, full_argmax, full_cache):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    zeros = jnp.zeros_like(full_cache.k)
    cache = KVCache(k=jnp.concatenate([full_cache.k, zeros], axis=3),
                    v=jnp.concatenate([full_cache.v, zeros], axis=3),
                    lengths=jnp.zeros((batch,), jnp.int32))
    t, j = jnp.arange(length)[:, None], jnp.arange(2 * length)[None]
    mask = jnp.broadcast_to((j < t) | (j == length + t), (batch, length, 2 * length))
    out = model.apply({'params': params}, tokens, positions, mask, cache,
                      write_slots=positions + length, layers=keep)
    draft = jnp.argmax(out.logits[..., :model.config.vocab_size], axis=-1)
    counted = (t.T >= starts[:, None] - 1) & (t.T < lengths[:, None] - 1)
    return jnp.sum((draft == full_argmax) & counted), jnp.sum(counted)

  def target(params, tokens):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    out = model.apply({'params': params}, tokens, positions,
                      cache=KVCache.empty(model.config, batch, length))
    return jnp.argmax(out.logits[..., :model.config.vocab_size], axis=-1), out.cache

  return jax.jit(target), jax.jit(run)


def head_share(config) -> float:
  """h: the LM head's share of one token's forward FLOPs, from parameter counts."""
  d, f = config.d_model, config.mlp_dim
  block = d * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim \
      + config.num_heads * config.head_dim * d + 3 * d * f
  head = config.padded_vocab_size * d
  return head / (head + config.num_layers * block)


def predicted(alpha: float, k: int, skip, num_layers: int, h: float, curve) -> tuple:
  """(tau, speedup over plain decoding) of skip set `skip` at draft length k (module
  docstring)."""
  from decoding import cost_model
  alpha = min(alpha, 1 - 1e-9)
  tau = (1 - alpha ** (k + 1)) / (1 - alpha)
  kept, shared = num_layers - len(skip), min(skip)
  draft = h + (1 - h) * kept / num_layers
  cost = (k * draft + cost_model.verify_cost(curve, k + 1)
          * (h + (1 - h) * (num_layers - shared) / num_layers)
          + (1 - h) * shared / num_layers)
  return tau, tau / cost


def search(model, params, tokens, lengths, starts, *, max_skip: int, width: int = 3,
           max_draft: int = 8, curve=None, log=print) -> dict:
  """The greedy skip-set search (module docstring) on calibration sequences.

  tokens: [B, S] int32 right-padded prompt + the target's greedy continuation; lengths,
  starts: [B] the sequence and prompt lengths. max_skip: the most blocks skipped (>= 1).
  curve: the verify-cost curve {T: cost}; None = flat. Returns {'skip_layers',
  'num_draft', 'alpha', 'predicted_tau', 'predicted_speedup', 'path': [{skip, alpha}],
  'single': {block: alpha}}. Raises ValueError for max_skip outside [1, L)."""
  import jax.numpy as jnp
  num_layers = model.config.num_layers
  if not 1 <= max_skip < num_layers:
    raise ValueError(f'max_skip={max_skip} blocks is outside [1, {num_layers}).')
  curve = curve or {1: 1.0, 2: 1.0}  # flat: c(T) = 1
  target, run = acceptance_program(model)
  full_argmax, full_cache = target(params, tokens)

  def alpha(skip):
    keep = jnp.asarray([i for i in range(num_layers) if i not in skip], jnp.int32)
    agree, total = run(params, tokens, lengths, starts, keep, full_argmax, full_cache)
    return float(agree) / max(float(total), 1.0)

  single = {i: alpha((i,)) for i in range(num_layers)}
  log(f'alpha with one block skipped: {json.dumps({i: round(a, 3) for i, a in single.items()})}')
  ranked = sorted(single, key=lambda i: -single[i])
  skip, path = (), []
  while len(skip) < max_skip:
    tried = {i: alpha(skip + (i,)) for i in [i for i in ranked if i not in skip][:width]}
    best = max(tried, key=tried.get)
    skip = tuple(sorted(skip + (best,)))
    path.append({'skip': list(skip), 'alpha': tried[best]})
    log(f'skip {list(skip)}: alpha {tried[best]:.3f}')
  h = head_share(model.config)
  best = None
  for step in path:
    for k in range(1, max_draft + 1):
      tau, speedup = predicted(step['alpha'], k, step['skip'], num_layers, h, curve)
      if best is None or speedup > best['predicted_speedup']:
        best = dict(skip_layers=step['skip'], num_draft=k, alpha=step['alpha'],
                    predicted_tau=tau, predicted_speedup=speedup)
  return dict(best, path=path, single={str(i): a for i, a in single.items()})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from launch import common
  common.setup_logging()
  import jax.numpy as jnp
  from decoding import driver
  from decoding.self_speculative import SKIP_FILE
  from launch import benchmarking, generation
  from training import checkpoints
  with common.user_errors_as_messages():
    t0 = time.perf_counter()
    restored = checkpoints.restore_model(_WORKDIR.value)
    num_layers = restored.model.config.num_layers
    max_skip = int(_MAX_SKIP.value * num_layers)
    if not 1 <= max_skip < num_layers:
      raise ValueError(f'--max_skip={_MAX_SKIP.value} skips {max_skip} of {num_layers} '
                       'blocks; it must skip at least one and keep at least one.')
    chat = getattr(restored.tokenizer, 'chat_template', None) is not None
    if _PROMPT_FILE.value:
      items = generation.read_prompt_file(_PROMPT_FILE.value)
    else:  # Chat requests for a chat model, plain text otherwise.
      items = [generation.Prompt(messages=({'role': 'user', 'content': t},)) if chat
               else generation.Prompt(text=t) for t in CALIBRATION_PROMPTS]
    prompts = generation.encode_prompts(restored.tokenizer, items, chat)
    options = generation.DecodeOptions(max_new_tokens=_NEW_TOKENS.value)
    completions, _ = generation.decode_tokens(restored, prompts, 'autoregressive', options)
    sequences = [p + c for p, c in zip(prompts, completions)]
    tokens, lengths = driver.pad_prompts(sequences, restored.tokenizer.pad_id)
    starts = jnp.asarray([len(p) for p in prompts], jnp.int32)
    curve = None
    if _COST.value == 'measured':
      context = int(max(lengths))
      curve = benchmarking.verify_cost_curve(restored, 1, context, tokens=(1, 2, 4, 8, 16))
    result = search(restored.model, restored.params, jnp.asarray(tokens), jnp.asarray(lengths),
                    starts, max_skip=max_skip, width=_WIDTH.value,
                    max_draft=_MAX_DRAFT.value, curve=curve, log=logging.info)
    # The chosen set's real tau: self-speculative decoding of the calibration prompts.
    spec = generation.DecodeOptions(max_new_tokens=_NEW_TOKENS.value,
                                    skip_layers=','.join(map(str, result['skip_layers'])),
                                    num_draft=result['num_draft'])
    _, stats = generation.decode_tokens(restored, prompts, 'self_speculative', spec)
    result.update(measured_tau=stats['mean_accepted'], verify_cost=_COST.value,
                  calibration_prompts=len(prompts), search_s=round(time.perf_counter() - t0, 1))
    with open(os.path.join(_WORKDIR.value, SKIP_FILE), 'w') as f:
      json.dump(result, f, indent=1)
  print(f'skip {result["skip_layers"]} (of {num_layers} blocks), num_draft '
        f'{result["num_draft"]}: alpha {result["alpha"]:.3f}, predicted tau '
        f'{result["predicted_tau"]:.2f}, speedup {result["predicted_speedup"]:.2f}; measured '
        f'tau {result["measured_tau"]:.2f}; written to {os.path.join(_WORKDIR.value, SKIP_FILE)}')


if __name__ == '__main__':
  app.run(main)
