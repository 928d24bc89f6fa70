"""The benchmark library behind launch.bench and launch.quickstart: every decoding method
against plain autoregressive decoding on the same prompts, in one process.

Speed is reported as measured ratios in the same run, never asserted in tests.
"""
import dataclasses
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from decoding import driver, registry, trees
from launch import generation
from models import quant



# The bfloat16 contract: lossless methods reproduce plain AR token for token in float32.
# In bfloat16, a batched or multi-token call can round a logit differently from a
# one-token call, so an output may leave AR's at a near-tie: a position where AR's top-2
# logits differ by at most NEAR_TIE_REL * max(|top logit|, 1) (2^-5: about 4 bfloat16
# ulps). Any other divergence is a fault.
NEAR_TIE_REL = 2.0 ** -5


def first_divergence(model, params, prompt, ar_ids, other_ids):
  """None when `other_ids` equals AR's `ar_ids`; else (index, top-2 logit gap of the
  target at AR's first differing position (one plain call over prompt + AR's tokens
  before it), the near-tie bound there)."""
  ar_ids, other_ids = list(ar_ids), list(other_ids)
  if ar_ids == other_ids:
    return None
  index = next((i for i, (a, b) in enumerate(zip(ar_ids, other_ids)) if a != b),
               min(len(ar_ids), len(other_ids)))
  ids = jnp.asarray([list(prompt) + ar_ids[:index]], jnp.int32)
  positions = jnp.arange(ids.shape[1])[None]
  logits = model.apply({'params': params}, ids, positions).logits[0, -1, :model.config.vocab_size]
  top2 = np.asarray(jax.lax.top_k(logits.astype(jnp.float32), 2)[0], np.float64)
  return index, float(top2[0] - top2[1]), NEAR_TIE_REL * max(abs(float(top2[0])), 1.0)


def ar_agreement(model, params, prompts, ar_completions, completions) -> str:
  """'identical' (every row equals AR's), 'near-tie' (rows that differ first differ at
  a near-tie, see NEAR_TIE_REL: bfloat16 numerics) or 'differs' (a fault)."""
  verdict = 'identical'
  for prompt, ar_ids, ids in zip(prompts, ar_completions, completions):
    found = first_divergence(model, params, prompt, ar_ids, ids)
    if found is None:
      continue
    if found[1] > found[2]:
      return 'differs'
    verdict = 'near-tie'
  return verdict


def sample_quality(ar, prompts, completions) -> dict:
  """How an AR model scores samples drawn elsewhere (MDLM / BD3-LM's sample metrics).

  Args:
    ar: a restored AR model (its tokenizer must be the samples').
    prompts: one prompt (token ids) per completion, or a single prompt for all of them.
    completions: generated token ids per row (lists; empty rows are skipped).
  Returns {'gen_ppl': exp of the AR model's mean NLL per generated token given its prompt,
  'entropy_bits': the mean over rows of each row's unigram entropy in bits (low values
  flag degenerate repetition)}.
  """
  import math
  from models import masks
  if prompts and isinstance(prompts[0], int):
    prompts = [prompts] * len(completions)
  apply = jax.jit(lambda tokens: ar.model.apply({'params': ar.params}, tokens,
                                                np.arange(tokens.shape[1])[None],
                                                masks.causal_mask(1, tokens.shape[1])).logits)
  nll, count, entropies = 0.0, 0, []
  for prompt, ids in zip(prompts, completions):
    if not ids:
      continue
    tokens = np.asarray([list(prompt) + list(ids)], np.int32)
    logp = np.asarray(jax.nn.log_softmax(apply(tokens)[0], -1))
    positions = np.arange(len(prompt) - 1, tokens.shape[1] - 1)
    nll -= float(logp[positions, tokens[0, len(prompt):]].sum())
    count += len(ids)
    _, freq = np.unique(ids, return_counts=True)
    p = freq / freq.sum()
    entropies.append(float(-(p * np.log2(p)).sum()))
  return {'gen_ppl': math.exp(nll / max(count, 1)),
          'entropy_bits': float(np.mean(entropies)) if entropies else None}


def _quality(target, model, prompts, completions) -> dict:
  """gen_ppl / entropy_bits of another family's samples under the target, when the two
  share a tokenizer (else nothing: the target cannot score them)."""
  same = (type(target.tokenizer) is type(model.tokenizer)
          and target.tokenizer.vocab_size == model.tokenizer.vocab_size)
  if not completions or not same:
    return {}
  return sample_quality(target, prompts, completions)


def token_agreement(model, params, prompts, completions) -> list[float]:
  """Per row, the fraction of a (lossy) method's new tokens that equal the full model's
  greedy token on the same prefix (teacher forced: one plain call over prompt +
  completion): CALM's consistency with the full model, token by token. A row without
  new tokens counts 1."""
  out = []
  for prompt, ids in zip(prompts, completions):
    if not ids:
      out.append(1.0)
      continue
    seq = jnp.asarray([list(prompt) + list(ids)], jnp.int32)
    logits = model.apply({'params': params}, seq, jnp.arange(seq.shape[1])[None]).logits
    top = np.asarray(jnp.argmax(logits[0, :, :model.config.vocab_size], -1))
    full = top[len(prompt) - 1:len(prompt) - 1 + len(ids)]
    out.append(float(np.mean(full == np.asarray(ids))))
  return out


def validation_prompts(restored, num_prompts: int, prompt_len: int, split: str = 'validation',
                       skip: int = 0) -> list[list[int]]:
  """The first `prompt_len` tokens ([bos] + text) of validation documents long enough
  (of the `split` split, 'train' or 'validation'; after the first `skip` such ones)."""
  from training import data
  if split not in ('train', 'validation'):
    raise ValueError(f'Unknown corpus split {split!r}: expected train or validation.')
  sources = data.load_sources(restored.config.data)
  tok, prompts, seen = restored.tokenizer, [], 0
  for text in sources[split].texts():
    ids = [*tok.bos_prefix, *tok.encode(text)[:prompt_len - len(tok.bos_prefix)].tolist()]
    if len(ids) == prompt_len:
      seen += 1
      if seen > skip:
        prompts.append(ids)
    if len(prompts) == num_prompts:
      return prompts
  raise ValueError(f'The {split} split has fewer than {skip + num_prompts} documents of '
                   f'{prompt_len} tokens.')


def naive_generate(model, params, prompts, lengths, max_new_tokens, capacity, eos_id):
  """Reference: the same prefill, then a Python loop calling a jitted one-token step and
  checking the stop condition on the host every token (greedy). -> (tokens [B, S], calls)."""
  from decoding import driver
  prefill, step = _naive_steps(model, capacity)
  cache, tokens, lengths = prefill(params, prompts, lengths)
  limits = np.asarray(driver.row_limits(lengths, max_new_tokens, capacity))
  done = np.zeros(len(limits), bool)
  calls = 1
  while True:
    done |= (np.asarray(tokens[jnp.arange(len(limits)), lengths - 1]) == eos_id)
    done |= np.asarray(lengths) >= limits
    if done.all():
      return tokens, calls
    cache, tokens, lengths = step(params, cache, tokens, lengths, jnp.asarray(done))
    calls += 1


@functools.lru_cache
def _naive_steps(model, capacity):
  """Jitted prefill and one-token step of the naive reference (cached per model)."""
  from models import KVCache

  @jax.jit
  def prefill(params, prompts, lengths):
    batch, plen = prompts.shape
    cache = KVCache.empty(model.config, batch, capacity)
    out = model.apply({'params': params}, prompts, jnp.broadcast_to(jnp.arange(plen), prompts.shape),
                      cache=cache)
    first = jnp.argmax(out.logits[jnp.arange(batch), lengths - 1, :model.config.vocab_size], -1)
    tokens = jnp.zeros((batch, capacity), jnp.int32).at[:, :plen].set(prompts)
    tokens = tokens.at[jnp.arange(batch), lengths].set(first)
    return out.cache.keep(lengths), tokens, lengths + 1

  @jax.jit
  def step(params, cache, tokens, lengths, done):
    rows = jnp.arange(tokens.shape[0])
    out = model.apply({'params': params}, tokens[rows, lengths - 1][:, None],
                      (lengths - 1)[:, None], cache=cache)
    new = jnp.argmax(out.logits[:, 0, :model.config.vocab_size], -1)
    tokens = tokens.at[rows, jnp.where(done, capacity, lengths)].set(new, mode='drop')
    cache = out.cache.keep(jnp.where(done, cache.lengths, out.cache.lengths))
    return cache, tokens, lengths + (~done)

  return prefill, step


def _naive_record(restored, prompts, config, batch_size, ar_completions) -> dict:
  """The naive reference over the same prompts and batches (greedy)."""
  from decoding import driver
  model, params = restored.model, jax.device_put(restored.params)
  capacity = config.prompt_len + config.max_new_tokens
  eos, wall, calls, first_s, completions = restored.tokenizer.eos_id, 0.0, 0, 0.0, []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded, lengths = driver.pad_prompts(chunk + [chunk[0]] * (batch_size - len(chunk)))
    run = lambda: naive_generate(model, params, jnp.asarray(padded), jnp.asarray(lengths),
                                 config.max_new_tokens, capacity, eos)
    t0 = time.perf_counter()
    run()
    first_s = max(first_s, time.perf_counter() - t0)  # includes compiling prefill and step
    times = []
    for _ in range(config.repeats):
      t0 = time.perf_counter()
      tokens, n_calls = jax.block_until_ready(run())
      times.append(time.perf_counter() - t0)
    wall += statistics.median(times)
    calls += n_calls
    tokens = np.asarray(tokens)
    for row in range(len(chunk)):
      new = tokens[row, config.prompt_len:].tolist()
      stop = next((i + 1 for i, t in enumerate(new) if t == eos), len(new))
      completions.append(new[:stop])
  new_tokens = sum(map(len, completions))
  return dict(method='naive_python_loop', lossless=True, mean_accepted=1.0, target_calls=calls,
              draft_calls=0, new_tokens=new_tokens, wall_s=wall,
              tokens_per_s=new_tokens / wall, compile_s=max(first_s - wall, 0.0),
              matches_ar=completions == ar_completions)


def _method_variants(config, methods) -> list[tuple[str, str, bool, bool]]:
  """(method, tree, typical, auto) for each run of `methods` on one model: autoregressive
  first, then each method once per entry of config.trees.<method> ('' = the method's
  default tree; a method with no entry runs once with ''), methods listed in
  config.typical once more with typical acceptance (LOSSY) on their last tree (early_exit:
  once per config.exit_thresholds, the threshold in the tree's place), and
  methods listed in config.auto once more with their draft length chosen by the cost
  model (launch/autotune.py: `--num_draft=auto`)."""
  trees_of = config.get('trees', {})
  runs = [('autoregressive', '', False, False)]
  for method in methods:
    if method == 'autoregressive':
      continue
    variants = tuple(trees_of.get(method, ('',))) or ('',)
    if method == 'early_exit':  # one run per threshold (in the tree's place)
      variants = tuple(str(float(t)) for t in config.get('exit_thresholds', ())) or ('',)
    runs += [(method, tree, False, False) for tree in variants]
    if method in config.get('typical', ()):
      runs.append((method, variants[-1], True, False))
    if method in config.get('auto', ()):
      entry = registry.get(method)
      if entry.draft_length is None and not (entry.tuned_tree or entry.dynamic_tree):
        raise ValueError(f'config.auto: {method} has no draft length or tree size to choose.')
      runs.append((method, '', False, True))
  return runs


def _name(method: str, typical: bool, stats: dict) -> str:
  """The table's name of a record: the method's label, _typical, and its tree."""
  tree = f'({trees.label(stats["tree"])})' if 'tree' in stats else ''
  if 'threshold' in stats:  # early exit: its threshold and confidence measure
    tree = f'(threshold {stats["threshold"]:g}, {stats["confidence"]})'
  return registry.get(method).label + ('_typical' if typical else '') + tree


def _second_models(config, methods) -> dict:
  """{method: restored second model (a draft, heads, or the method's own model)}."""
  from training import checkpoints
  second = {}
  for name in methods:
    method = registry.get(name)
    if method.second or method.own_model:
      workdir = config.get('workdirs', {}).get(name, '')
      if not workdir:
        raise ValueError(f'The {name} method needs config.workdirs.{name} (its '
                         f'{"model" if method.own_model else "second model"}).')
      second[name] = checkpoints.restore_model(workdir)
  return second


# ---- memory -------------------------------------------------------------------------------

def reset_peak_memory() -> None:
  """Starts a new host peak: writing 5 to /proc/self/clear_refs resets the process's
  peak resident set (VmHWM; Linux >= 4.0). tracemalloc and getrusage miss XLA's
  allocations (or never reset), so the peak is read from the kernel. No-op elsewhere."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def _status_mb(field: str) -> float | None:
  """A /proc/self/status memory field (VmHWM, VmRSS) in MiB, or None off Linux."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def peak_memory() -> dict:
  """{'peak_rss_mb': the process's peak resident host memory since reset_peak_memory
  (MiB; weights, caches, compilation and every engine in the process included),
  'device_peak_mb': the first device's peak bytes in use (accelerators; None on CPU, whose
  XLA allocations are host memory, counted in the RSS)}."""
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # Backends without memory statistics.  # pylint: disable=broad-except
    pass
  device = stats.get('peak_bytes_in_use') if stats else None
  return dict(peak_rss_mb=_status_mb('VmHWM'),
              device_peak_mb=None if device is None else device / 2 ** 20)


# ---- the verify-cost curve ----------------------------------------------------------------

VERIFY_COST_FILE = 'verify_cost.json'
VERIFY_COST_TOKENS = (1, 2, 4, 8, 16, 32, 64)


_KEY_FIELDS = ('model', 'model_config', 'trunk', 'backend', 'device', 'batch_size', 'dtype',
               'capacity', 'context', 'weight_layout', 'timing')
# How measure_verify_cost times a call (its cache donated to each run); curves timed
# another way are measured again.
_TIMING = 'donated cache'


def _trunk_digest() -> str:
  """A digest of the source of the modules a cached forward runs (the trunk, the cache,
  quantized products and their CPU kernel, and whether that kernel is in use): a curve
  measured before a change to them is stale."""
  import hashlib
  from models import cpu_kernels, kv_cache, quant, transformer
  digest = hashlib.sha1()
  for path in (transformer.__file__, kv_cache.__file__, quant.__file__, cpu_kernels.SOURCE):
    with open(path, 'rb') as f:
      digest.update(f.read())
  digest.update(b'kernels on' if cpu_kernels.available() else b'kernels off')
  return digest.hexdigest()[:12]


def verify_cost_key(restored, batch_size: int, context: int, capacity: int,
                    weight_layout: str = 'auto') -> dict:
  """What a verify-cost measurement depends on: the model (its workdir and a digest of its
  architecture), the backend and device, the batch size, the activation dtype, the cache
  capacity, the context (filled slots) and the weights' layout (launch.generation.
  effective_layout: the curve is measured on the layout the decode reads); `trunk`, a
  digest of the trunk's source, retires curves measured before the code changed, and
  `timing` those timed before measure_verify_cost donated its cache."""
  import hashlib
  config = restored.model.config
  return dict(model=os.path.abspath(restored.workdir),
              model_config=hashlib.sha1(repr(config).encode()).hexdigest()[:12],
              trunk=_trunk_digest(), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              batch_size=batch_size, dtype=jnp.dtype(config.activation_dtype).name,
              capacity=capacity, context=context,
              weight_layout=generation.default_mesh_layout(weight_layout),
              timing=_TIMING)


def measure_verify_cost(restored, batch_size: int, context: int, capacity: int | None = None,
                        tokens=VERIFY_COST_TOKENS, seconds: float = 0.3, repeats: int = 3,
                        seed: int = 0, weight_layout: str = 'auto') -> dict:
  """Measures the cost of ONE cached forward call of T tokens (a chain verify of T - 1
  drafted tokens: the target's call in a speculative round, SpecInfer / Leviathan et al.
  2023 Sec. 3.4's "cost coefficient" seen from the target's side) for each T in `tokens`,
  on a cache of `capacity` slots holding `context` tokens, at `batch_size` rows: the
  curve the cost model (`--num_draft=auto`) reads.

  The timing is launch.trunk_cost.forward_cost's (each T its own program; calls in one
  loop lasting about `seconds`, the median of `repeats` runs; the cache donated to each
  run, as the decoding loop updates it in place); `seed` draws the random tokens.
  weight_layout: the target weights' layout, as the decode reads them
  (launch.generation.decoding_params); in the decoding layout each T is timed in the
  orientation a decode reads it in (generation.decode_orientation: T = 1 at batch 1 in
  'rows', as plain decoding of one row; verify calls in 'columns', or in 'rows' at batch
  1 for a model the quantized CPU kernel reads), so the curve prices a round against a
  plain step. capacity None: context + max(tokens).
  Returns verify_cost_key(...) plus {'tokens': [T...], 'ms': [ms per call...],
  'relative': [ms / ms at T = 1...], 'measured_at': unix time}.
  Raises ValueError when context + max(tokens) does not fit the capacity or T = 1 is not
  measured (the curve is relative to it).
  """
  from launch import trunk_cost
  tokens = sorted(set(int(t) for t in tokens))
  capacity = capacity or context + tokens[-1]
  if tokens[0] != 1 or context < 1 or context + tokens[-1] > capacity:
    raise ValueError(f'The verify-cost curve needs T = 1 among the token counts and context '
                     f'({context}) >= 1 with context + max T ({tokens[-1]}) <= capacity '
                     f'({capacity}).')
  params = {orientation: generation.measured_params(restored.params, weight_layout, orientation)
            for orientation in ('rows', 'columns')}
  cost = trunk_cost.forward_cost(
      restored.model,
      lambda t: params[generation.decode_orientation(restored.params, batch_size, t == 1)],
      batch_size, context, capacity, tokens, seconds=seconds, repeats=repeats, seed=seed)
  return dict(verify_cost_key(restored, batch_size, context, capacity, weight_layout),
              tokens=cost['tokens'], ms=cost['ms'], relative=cost['relative'],
              measured_at=time.time())


def _read_verify_costs(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, VERIFY_COST_FILE)) as f:
      entries = json.load(f)
  except (OSError, ValueError):
    return []
  return entries if isinstance(entries, list) else []


def _same_key(entry: dict, key: dict) -> bool:
  return all(entry.get(k) == v for k, v in key.items())


def save_verify_cost(workdir: str, entry: dict) -> bool:
  """Stores a measure_verify_cost entry in WORKDIR/verify_cost.json, replacing one of the
  same key. Returns False (and writes nothing) when the workdir is not writable."""
  key = {k: entry[k] for k in _KEY_FIELDS}
  entries = [e for e in _read_verify_costs(workdir) if not _same_key(e, key)] + [entry]
  try:
    with open(os.path.join(workdir, VERIFY_COST_FILE) + '.tmp', 'w') as f:
      json.dump(entries, f, indent=1)
    os.replace(os.path.join(workdir, VERIFY_COST_FILE) + '.tmp',
               os.path.join(workdir, VERIFY_COST_FILE))
  except OSError:
    return False
  return True


def load_verify_cost(restored, batch_size: int, context: int, capacity: int,
                     weight_layout: str = 'auto') -> dict | None:
  """The cached curve of this model, backend, device, batch size, dtype, capacity and
  context (WORKDIR/verify_cost.json of the model's workdir) as {T: relative cost}, or None
  when none was measured. For a cost model: a round of T target tokens costs
  relative[T] target calls of one token."""
  key = verify_cost_key(restored, batch_size, context, capacity, weight_layout)
  for entry in reversed(_read_verify_costs(restored.workdir)):
    if _same_key(entry, key):
      return dict(zip(entry['tokens'], entry['relative']))
  return None


def verify_cost_curve(restored, batch_size: int, context: int, capacity: int | None = None,
                      tokens=VERIFY_COST_TOKENS, reuse: bool = True,
                      weight_layout: str = 'auto', **measure) -> dict:
  """{T: cost of one cached forward call of T tokens / cost at T = 1} for the restored
  model on this backend at `batch_size` rows, a cache of `capacity` slots holding `context`
  tokens (capacity None: context + max(tokens)). With reuse, a cached curve covering
  `tokens` (load_verify_cost) is returned without measuring; otherwise it is measured
  (measure_verify_cost; `measure` passes seconds / repeats / seed) and cached in the
  model's workdir. weight_layout: the layout the decode reads (launch.generation.
  decoding_params). Raises ValueError as measure_verify_cost does."""
  capacity = capacity or context + max(tokens)
  if reuse:
    cached = load_verify_cost(restored, batch_size, context, capacity, weight_layout)
    if cached is not None and set(tokens) <= set(cached):
      return {t: cached[t] for t in sorted(set(tokens))}
  entry = measure_verify_cost(restored, batch_size, context, capacity, tokens,
                              weight_layout=weight_layout, **measure)
  save_verify_cost(restored.workdir, entry)
  return dict(zip(entry['tokens'], entry['relative']))


def plot_verify_cost(entries: list[dict], path: str) -> None:
  """T (log 2) against the relative cost of one call, one line per batch size; the dashed
  line T is what T one-token calls would cost."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for entry in entries:
    ax.plot(entry['tokens'], entry['relative'], marker='o',
            label=f'batch {entry["batch_size"]} ({entry["ms"][0]:.1f} ms at T=1)')
  top = max(max(e['tokens']) for e in entries)
  ts = [2 ** i for i in range(top.bit_length()) if 2 ** i <= top]
  ax.plot(ts, ts, linestyle='--', color='gray', label='T calls of one token')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log', base=2)
  ax.set_xlabel('tokens per call T')
  ax.set_ylabel('cost / cost of one token')
  e = entries[0]
  ax.set_title(f'verify cost: {os.path.basename(e["model"])}, {e["backend"]}, {e["dtype"]}, '
               f'context {e["context"]}/{e["capacity"]}', fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---- prompts --------------------------------------------------------------------------------

def prompt_sets(restored, config) -> dict[str, list[list[int]]]:
  """{category: token prompts} in the model's own tokens: the prompts of
  config.prompt_file (plain text, JSONL or Spec-Bench question.jsonl;
  generation.read_prompt_file), rendered with the model's chat template when config.chat
  and the model has one, grouped by category in file order (no category: 'all'), at most
  config.prompts_per_category each (0 = all); without a prompt file, the validation split
  (config.num_prompts of config.prompt_len tokens) as category 'validation'."""
  from launch import generation
  if not config.get('prompt_file'):
    return {'validation': validation_prompts(restored, config.num_prompts, config.prompt_len)}
  prompts = generation.read_prompt_file(config.prompt_file)
  if not prompts:
    raise ValueError(f'{config.prompt_file} holds no prompts.')
  chat = bool(config.get('chat', True)) and restored.tokenizer.chat_template is not None
  encoded = generation.encode_prompts(restored.tokenizer, prompts, chat)
  sets, limit = {}, config.get('prompts_per_category', 0)
  for prompt, ids in zip(prompts, encoded):
    group = sets.setdefault(prompt.category or 'all', [])
    if not limit or len(group) < limit:
      group.append(ids)
  return sets


def fill_batches(prompts: list, batch_size: int) -> list:
  """The prompts cycled to a whole number of batches of `batch_size` rows: at batch 8 a
  category of 1-4 prompts is decoded as 8 real rows, by every engine alike (ours and the
  baselines), and every row's tokens count in the throughput. Without it our decoder
  filled its batch with copies it did not count while transformers decoded the lone
  prompt at batch 1."""
  rows = -(-len(prompts) // batch_size) * batch_size
  return [prompts[i % len(prompts)] for i in range(rows)]


def _capacity(config, prompts: list[list[int]]) -> int:
  """The context limit of a prompt set: the validation prompts' fixed length plus
  max_new_tokens, or the longest prompt plus max_new_tokens (what launch.decode sizes)."""
  if not config.get('prompt_file'):
    return config.prompt_len + config.max_new_tokens
  return max(map(len, prompts)) + config.max_new_tokens


# ---- the benchmark ----------------------------------------------------------------------------

_LATENCY = ('prefill_ms', 'decode_tokens_per_s')


def _lossy_fields(model, prompts, completions, stats, temperature, lossless) -> dict:
  """A lossy greedy row's token agreement with the full model (token_agreement), and an
  early-exit row's mean exit layer and blocks per step."""
  out = {}
  if not lossless and temperature == 0:
    out['token_agreement'] = float(np.mean(token_agreement(model.model, model.params, prompts,
                                                           completions)))
  for key in ('mean_exit_layer', 'blocks_per_step', 'exit_histogram'):
    if key in stats:
      out[key] = stats[key]
  return out


def _record(name, stats, ar, machine, **fields) -> dict:
  """A bench row: counts, speed, latency split and memory, with ratios to our AR (`ar`:
  AR's stats in the same group; None for AR itself)."""
  ar = ar or stats
  # tau: 1 for plain decoding; not measured (None) for the baselines, which count no calls
  tau = stats.get('mean_accepted', 1.0 if stats.get('target_calls') is not None else None)
  record = dict(method=name, **fields, mean_accepted=tau,
                target_calls=stats.get('target_calls'), draft_calls=stats.get('draft_calls', 0),
                new_tokens=stats['new_tokens'], wall_s=stats['wall_s'],
                tokens_per_s=stats['tokens_per_s'],
                speedup_vs_ar=stats['tokens_per_s'] / ar['tokens_per_s'],
                compile_s=stats.get('compile_s'))
  if 'nfe' in stats:   # model calls per generated token (block diffusion)
    record['nfe_per_token'] = stats['nfe'] / max(stats['new_tokens'], 1)
  for key in ('prefill_calls', 'prefill_s', 'prefill_ms', 'decode_s', 'decode_tokens',
              'decode_tokens_per_s',
              'prefill_compile_s', 'programs', 'peak_rss_mb', 'device_peak_mb', 'auto',
              'engine_weights', 'engine_kv_cache', 'weight_layout', 'weight_orientation'):
    if key in stats:
      record[key] = stats[key]
  if 'decode_tokens_per_s' in stats and ar.get('decode_tokens_per_s'):  # 0: EOS at once
    record['decode_speedup_vs_ar'] = stats['decode_tokens_per_s'] / ar['decode_tokens_per_s']
  record.update(machine)
  return record


def _baseline_rows(config, restored, engines, category, prompts, batch_size, ar, machine,
                   skipped) -> list[dict]:
  """transformers and llama.cpp rows on the target's weights for one prompt set (greedy);
  engines: {'transformers': model | None, 'llama.cpp': LlamaCpp | None} built once."""
  from launch import baselines
  rows, tok = [], restored.tokenizer
  lookup = config.get('prompt_lookup_tokens', 0)
  runs = [(e, k) for e in config.get('baselines', ()) for k in dict.fromkeys((0, lookup))]
  for engine, k in runs:
    name = f'{engine}_prompt_lookup({k})' if k else (
        'transformers_generate' if engine == 'transformers' else engine)
    if engine not in engines:  # Not installed or failed to load: in `skipped` once.
      continue
    if batch_size != 1 and (k or engine == 'llama.cpp'):
      skipped.setdefault(f'{name} batch {batch_size}',
                         f'{engine} drafts / decodes one row at a time here (batch 1 only)')
      continue
    reset_peak_memory()
    try:
      if engine == 'transformers':
        completions, stats = baselines.hf_generate(
            engines[engine], prompts, batch_size, config.max_new_tokens, tok.eos_ids,
            tok.pad_id, config.repeats, prompt_lookup=k, time_prefill=True)
      else:
        completions, stats = engines[engine].generate(
            prompts, config.max_new_tokens, tok.eos_ids, prompt_lookup=k,
            repeats=config.repeats)
    except Exception as e:  # Another engine's failure is a skipped row, not a lost bench.
      skipped[f'{name} {category} batch {batch_size}'] = f'{type(e).__name__}: {e}'
      continue
    stats.update(peak_memory())
    if engine == 'llama.cpp':
      stats['engine_weights'] = engines[engine].weights
      stats['engine_kv_cache'] = engines[engine].kv_cache
      if engines[engine].weights != 'f32 export':   # another file than the target's weights
        name += f'({engines[engine].weights})'
      if engines[engine].kv_cache != 'f16':         # not llama.cpp's default cache
        name += f'(kv {engines[engine].kv_cache})'

    rows.append(_record(name, stats, ar[1], machine, engine=engine, category=category,
                        lossless=True, batch_size=batch_size, temperature=0.0,
                        matches_ar=completions == ar[0], ar_agreement=None))
  return rows


def _engines(config, restored, capacity: int, directory: str, skipped: dict) -> dict:
  """The other engines config.baselines names, loaded once on the target's weights; one
  that cannot run is skipped with its reason in `skipped`."""
  from launch import baselines
  engines = {}
  for engine in config.get('baselines', ()):
    if engine not in baselines.ENGINES:
      raise ValueError(f'Unknown baseline {engine!r}; known: {", ".join(baselines.ENGINES)}.')
    kv_cache = config.get('llama_cpp_kv_cache', 'f16')
    if engine == 'llama.cpp' and kv_cache not in baselines.LlamaCpp.KV_CACHE_TYPES:
      raise ValueError(f'--config.llama_cpp_kv_cache={kv_cache!r} is not one of '
                       f'{", ".join(baselines.LlamaCpp.KV_CACHE_TYPES)}.')
    reason = baselines.unavailable(engine)
    if reason is not None:
      skipped[engine] = reason
      continue
    if engine == 'transformers':
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
      engines[engine] = baselines.load_transformers(restored, os.path.join(directory, 'hf'))
    else:
      try:
        engines[engine] = baselines.LlamaCpp(restored, os.path.join(directory, 'model-f32.gguf'),
                                             capacity, config.get('llama_cpp_gguf', ''), kv_cache)
      except Exception as e:  # pylint: disable=broad-except
        # An optional engine built outside this project: its failure to load is reported
        # as a skip, not allowed to end the benchmark of our own methods.
        skipped[engine] = f'failed to load: {type(e).__name__}: {e}'.splitlines()[0]
  return engines


def _decodes(method, model) -> bool:
  """Whether `method` accepts `model` (its check_model raises nothing)."""
  try:
    method.check_model(model)
  except ValueError:
    return False
  return True


def _methods(config, model=None) -> list[str]:
  """config.methods, plus (config.training_free) every registered method that decodes the
  target `model` with no second model (autoregressive, prompt lookup, Jacobi, ...; not
  early_exit on a model without exit heads)."""
  methods = list(config.methods)
  if config.get('training_free', False):
    methods += [m.name for m in registry.METHODS.values()
                if m.second is None and not m.own_model and m.name not in methods
                and (model is None or _decodes(m, model))]
  for name in methods:
    registry.get(name)  # Unknown names fail here, before any work.
  return methods


def run(config, workdir: str) -> list[dict]:
  """One record per prompt category x model x method x batch size x temperature, each
  model's AR first in its group: the target with every method that decodes it, then (if
  'mtp' is in config.methods) the multi-token prediction model with its own AR and its
  self-speculation; at temperature 0 the other engines of config.baselines on the target's
  weights; then (config.naive_reference) the naive Python loop.

  Writes WORKDIR/bench.json ({'records', 'verify_cost', 'skipped'}; after each prompt
  category, the records so far with 'partial': true), bench.md (the
  table, the per-category table, the verify-cost curve, what was skipped and why),
  bench.png and (config.verify_cost) verify_cost.png. Returns the records.
  """
  import tempfile
  from launch import generation
  from training import checkpoints
  registry.load_plugins(config.get('plugins', ()))
  bad = [b for b in config.batch_sizes if not isinstance(b, int) or b < 1]
  if bad or not config.batch_sizes:
    raise ValueError(f'--config.batch_sizes={tuple(config.batch_sizes)}; expected one or more '
                     'rows per call, each >= 1.')
  restored = checkpoints.restore_model(config.target_workdir)
  methods = _methods(config, restored.model)
  second = _second_models(config, methods)
  # (model, its label, [(method, tree, typical)]): speedups are against that model's AR.
  on_target = [m for m in methods if not registry.get(m).own_model]
  suites = [(restored, '', _method_variants(config, on_target))]
  for name in methods:
    if registry.get(name).own_model:
      variants = _method_variants(config, [name])
      if registry.get(name).reference != 'autoregressive':   # ASSD: any-order decoding
        variants = [(registry.get(name).reference, '', False, False)] + variants[1:]
      if registry.get(name).own_family:
        # A model of another family (BD3-LM) has no AR decoding of its own: its rows are
        # measured against the target's AR (an AR model of the same size, as BD3-LM
        # compares), with the generative perplexity of its samples under the target.
        variants = variants[1:]
      suites.append((second.pop(name), f'{name} model', variants))
  # The same texts for every model, in each model's own tokens.
  sets = {id(model): prompt_sets(model, config) for model, _, _ in suites}
  categories = list(sets[id(restored)])
  machine = {'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
             'devices': jax.device_count(), 'host': platform.processor() or platform.machine(),
             'cpu_count': os.cpu_count(), 'jax': jax.__version__}
  groups = [(b, t) for b in config.batch_sizes for t in config.temperatures]
  bar = tqdm.tqdm(total=len(groups) * len(categories) * sum(len(s[2]) for s in suites),
                  desc='bench', dynamic_ncols=True, disable=jax.process_index() != 0)
  records, skipped = [], {}
  time_prefill = config.get('time_prefill', True)
  # Another family's samples are scored by the target: the target's AR samples too.
  scores_samples = any(registry.get(m).own_family for m in methods)
  with tempfile.TemporaryDirectory() as exports:
    capacity = max(_capacity(config, p) for p in sets[id(restored)].values())
    engines = _engines(config, restored, capacity, exports, skipped)
    for batch_size, temperature in groups:
      for category in categories:
        for model, label, variants in suites:
          prompts = fill_batches(sets[id(model)][category], batch_size)
          options = generation.DecodeOptions(
              max_new_tokens=config.max_new_tokens, temperature=temperature, seed=config.seed,
              batch_size=batch_size, max_context=_capacity(config, prompts),
              prefill_chunk=config.get('prefill_chunk', driver.PREFILL_CHUNK),
              num_draft=config.num_draft, adaptive_threshold=config.adaptive_threshold,
              diffusion_steps=config.get('diffusion_steps', 0) or None,
              diffusion_sampler=config.get('diffusion_sampler', 'ancestral'),
              plugins=tuple(config.get('plugins', ())),
              weight_layout=config.get('weight_layout', 'auto'))
          # Each suite's first row is its reference, except another family's (BD3-LM),
          # measured against the target's AR.
          ar = target_ar if registry.get(variants[0][0]).own_family else None
          for method, tree, typical, auto in variants:
            bar.set_postfix(method=method + tree, category=category, batch=batch_size,
                            temperature=temperature)
            chosen = (dict(exit_threshold=float(tree) if tree else None,
                           exit_confidence=config.get('exit_confidence', 'softmax'))
                      if method == 'early_exit' else dict(tree=tree))
            method_options = registry.options_for(
                registry.get(method), dataclasses.replace(options, typical=typical, **chosen))
            if auto:   # the cost model's draft length, or tree size (launch/autotune.py)
              entry = registry.get(method)
              method_options = dataclasses.replace(
                  method_options, **{entry.draft_length or 'tree': 'auto'})
            reset_peak_memory()
            # A model of another family commits a whole block with its first token: it
            # has no first-token latency to split off.
            completions, stats = generation.decode_tokens(
                model, prompts, method, method_options, second.get(method),
                repeats=config.repeats, warmup=config.get('warmup', True),
                time_prefill=time_prefill and not registry.get(method).own_family)
            stats.update(peak_memory())
            name = _name(method, typical, stats) + (
                f'({label})' if method == 'autoregressive' and label else '') + (
                    f' auto({stats["auto"]["option"]}={stats["auto"]["chosen"]})' if auto
                    else '')
            bar.update(1)
            # XLA:CPU keeps every compiled program's code mapped (about 500 memory maps
            # per program on a 4-layer model, more on a 30-layer one) until the caches
            # are cleared, and a long run's ~100 programs hit the kernel's limit of 65530
            # maps: LLVM 'Cannot allocate memory', then a segfault. Each item compiles
            # its own programs anyway (compile_s is reported apart), so drop them here.
            jax.clear_caches()
            ar = ar or (completions, stats)
            lossless = stats['lossless']
            greedy_lossless = lossless and temperature == 0
            records.append(_record(
                name, stats, ar[1], machine, engine='ours', category=category,
                lossless=lossless, batch_size=batch_size, temperature=temperature,
                weight_bytes=quant.weight_bytes(model.params),
                matches_ar=(completions == ar[0]) if greedy_lossless else None,
                ar_agreement=(ar_agreement(restored.model, restored.params, prompts, ar[0],
                                           completions)
                              if greedy_lossless and model is restored else None),
                **_lossy_fields(model, prompts, completions, stats, temperature, lossless),
                **(_quality(restored, model, prompts, completions)
                   if registry.get(method).own_family or (
                       scores_samples and model is restored and method == 'autoregressive')
                   else {})))
          if model is restored:
            target_ar, target_prompts = ar, prompts
        if temperature == 0:
          records += _baseline_rows(config, restored, engines, category, target_prompts,
                                    batch_size, target_ar, machine, skipped)
        _write_json(workdir, records, [], skipped, partial=True)
        if config.naive_reference and temperature == 0 and not config.get('prompt_file'):
          naive = _naive_record(restored, target_prompts, config, batch_size, target_ar[0])
          naive['speedup_vs_ar'] = naive['tokens_per_s'] / target_ar[1]['tokens_per_s']
          records.append(dict(naive, engine='ours', category=category, batch_size=batch_size,
                              temperature=temperature, **machine))
    for engine in engines.values():   # free llama.cpp's model while its library is loaded
      getattr(engine, 'close', lambda: None)()
  bar.close()
  curves = []
  if config.get('verify_cost', False):
    for batch_size in config.batch_sizes:
      context = config.get('cost_context', 0) or capacity // 2
      cost_capacity = config.get('cost_capacity', 0) or capacity
      entry = measure_verify_cost(restored, batch_size, context,
                                  max(cost_capacity, context + max(config.cost_tokens)),
                                  config.cost_tokens,
                                  weight_layout=config.get('weight_layout', 'auto'))
      save_verify_cost(restored.workdir, entry)
      curves.append(entry)
  if jax.process_index() != 0:  # A multi-process run: process 0 writes the results.
    return records
  skipped_list = _write_json(workdir, records, curves, skipped)
  with open(os.path.join(workdir, 'bench.md'), 'w') as f:
    f.write(report(records, curves, skipped_list))
  plot(records, os.path.join(workdir, 'bench.png'))
  if curves:
    plot_verify_cost(curves, os.path.join(workdir, 'verify_cost.png'))
  return records


def _write_json(workdir: str, records: list[dict], curves: list[dict], skipped: dict,
                partial: bool = False) -> list[dict]:
  """WORKDIR/bench.json (process 0 only), replaced whole (written beside, then renamed).
  partial: the records so far, after each prompt category ('partial': true), so that a
  run stopped early (a time limit, a lent machine given back) keeps what it measured; the
  finished run's file replaces it. Returns the skipped list as written."""
  skipped_list = [dict(what=k, reason=v) for k, v in skipped.items()]
  if jax.process_index() != 0:
    return skipped_list
  os.makedirs(workdir, exist_ok=True)
  content = dict(records=records, verify_cost=curves, skipped=skipped_list)
  if partial:
    content['partial'] = True
  path = os.path.join(workdir, 'bench.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=1)
  os.replace(path + '.tmp', path)
  return skipped_list


def _group(r: dict) -> tuple:
  return (r['batch_size'], r['temperature'], r.get('category', ''))


def _group_label(group: tuple) -> str:
  batch, temperature, category = group
  return f'batch {batch}\nT={temperature:g}' + (f'\n{category}' if category else '')


def plot(records: list[dict], path: str) -> None:
  """Speedup over autoregressive and tau per method, one group of bars per
  (batch size, temperature, prompt category)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import re
  # One bar colour per method: an `auto` row's choice differs by group ('lookup
  # auto(num_draft=8)' here, '(num_draft=0)' there) and is in the tables, not the legend.
  label = lambda r: re.sub(r' auto\(\w+=\w+\)', ' auto', r['method'])
  groups = list(dict.fromkeys(_group(r) for r in records))
  methods = list(dict.fromkeys(label(r) for r in records))
  by_key = {(label(r), *_group(r)): r for r in records}
  fig, axes = plt.subplots(1, 2, figsize=(max(12, 2.2 * len(groups)), 5))
  width = 0.8 / len(methods)
  # Decode speed where rows split the prefill off (real prompts: a long prompt's prefill is
  # most of a run's wall time), else the whole run's.
  speed = (('decode_speedup_vs_ar', 'decode speedup vs AR (prefill excluded)')
           if any('decode_speedup_vs_ar' in r for r in records)
           else ('speedup_vs_ar', 'wall-clock speedup vs AR'))
  for panel, (key, title) in zip(axes, (speed, ('mean_accepted', 'tokens per target call (tau)'))):
    for i, method in enumerate(methods):
      values = [by_key.get((method, *g), {}).get(key) for g in groups]
      values = [float('nan') if v is None else v for v in values]
      panel.bar([g + i * width for g in range(len(groups))], values, width, label=method)
    panel.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    panel.set_xticklabels([_group_label(g) for g in groups], fontsize=8)
    panel.set_title(title)
    if key == speed[0]:
      panel.axhline(1.0, color='black', linewidth=0.8)
  handles, labels = axes[0].get_legend_handles_labels()
  rows = -(-len(methods) // 5)
  fig.legend(handles, labels, loc='lower center', ncol=min(len(methods), 5), fontsize=8)
  machine = records[0]
  fig.suptitle(f'{machine["backend"]} ({machine["device"]}), JAX {machine["jax"]}')
  fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _cell(value) -> str:
  return f'{value:.2f}' if isinstance(value, float) else str(value)


def markdown_table(records: list[dict]) -> str:
  """One row per record: counts, tau, speed, the latency split (prefill ms per batch call =
  time to first token; decode tokens/s after the first token, and its ratio to our AR's)
  and the peak host memory (MiB)."""
  cols = ['method', 'category', 'batch_size', 'temperature', 'lossless', 'matches_ar',
          'ar_agreement', 'mean_accepted', 'target_calls', 'draft_calls', 'tokens_per_s',
          'speedup_vs_ar', 'prefill_ms', 'decode_tokens_per_s', 'decode_speedup_vs_ar',
          'compile_s', 'peak_rss_mb']
  if any('gen_ppl' in r for r in records):
    cols += ['nfe_per_token', 'gen_ppl', 'entropy_bits']
  if any(r.get('device_peak_mb') is not None for r in records):
    cols.append('device_peak_mb')
  if any('token_agreement' in r or 'mean_exit_layer' in r for r in records):  # lossy rows
    cols += ['token_agreement', 'mean_exit_layer', 'blocks_per_step']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in records:
    lines.append('| ' + ' | '.join(_cell(r.get(c)) for c in cols) + ' |')
  machine = records[0]
  lines.append(f'\n{machine["backend"]} ({machine["device"]}, {machine["devices"]} device(s), '
               f'{machine["cpu_count"]} CPUs), JAX {machine["jax"]}')
  return '\n'.join(lines) + '\n'


def _row_label(record: dict) -> tuple[str, str]:
  """(the per-category table's row, the note its cell carries): a cost-model row
  ('lookup auto(num_draft=8)') is the method's one `auto` row, its choice in the cell."""
  method = record['method']
  if ' auto(' in method and method.endswith(')'):
    label, choice = method.split(' auto(', 1)
    return f'{label} auto', f' ({choice[:-1]})'
  return method, ''


def category_table(records: list[dict], key: str = 'decode_speedup_vs_ar') -> str:
  """Methods x prompt categories of `key` (default: decode tokens/s over our AR's), one
  table per (batch size, temperature); the cost model's rows of a method are one row,
  each cell naming its choice (0.97 (num_draft=0))."""
  out = []
  for batch, temperature in dict.fromkeys((r['batch_size'], r['temperature']) for r in records):
    rows = [r for r in records if (r['batch_size'], r['temperature']) == (batch, temperature)]
    categories = list(dict.fromkeys(r.get('category', '') for r in rows))
    out += [f'{key}, batch {batch}, temperature {temperature:g}:', '',
            '| method | ' + ' | '.join(categories) + ' |', '|---|' + '---|' * len(categories)]
    cells = {}
    for r in rows:
      label, note = _row_label(r)
      cells[label, r.get('category', '')] = _cell(r.get(key)) + note
    for label in dict.fromkeys(_row_label(r)[0] for r in rows):
      out.append(f'| {label} | ' + ' | '.join(cells.get((label, c), 'None')
                                              for c in categories) + ' |')
    out.append('')
  return '\n'.join(out)


def verify_cost_table(curves: list[dict]) -> str:
  """T x batch size: cost of one cached forward call of T tokens relative to T = 1."""
  if not curves:
    return ''
  tokens = curves[0]['tokens']
  e = curves[0]
  lines = [f'Verify cost (one cached call of T tokens / one token; {e["backend"]}, {e["dtype"]}, '
           f'context {e["context"]} of capacity {e["capacity"]}):', '',
           '| batch | ms at T=1 | ' + ' | '.join(f'T={t}' for t in tokens) + ' |',
           '|---|---|' + '---|' * len(tokens)]
  for c in curves:
    lines.append(f'| {c["batch_size"]} | {c["ms"][0]:.2f} | ' +
                 ' | '.join(f'{v:.2f}' for v in c['relative']) + ' |')
  return '\n'.join(lines) + '\n'


def report(records: list[dict], curves=(), skipped=()) -> str:
  """bench.md: the full table, the per-category decode speedups, the verify-cost curve and
  the rows skipped (with why)."""
  parts = [markdown_table(records)]
  if any('decode_speedup_vs_ar' in r for r in records):
    parts.append(category_table(records))
  if curves:
    parts.append(verify_cost_table(list(curves)))
  if skipped:
    parts.append('Skipped:\n' + '\n'.join(f'- {s["what"]}: {s["reason"]}' for s in skipped) +
                 '\n')
  return '\n'.join(parts)
