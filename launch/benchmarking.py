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

from decoding import registry, trees



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


def _method_variants(config, methods) -> list[tuple[str, str, bool]]:
  """(method, tree, typical) for each run of `methods` on one model: autoregressive
  first, then each method once per entry of config.trees.<method> ('' = the method's
  default tree; a method with no entry runs once with ''), and methods listed in
  config.typical once more with typical acceptance (LOSSY) on their last tree."""
  trees_of = config.get('trees', {})
  runs = [('autoregressive', '', False)]
  for method in methods:
    if method == 'autoregressive':
      continue
    variants = tuple(trees_of.get(method, ('',))) or ('',)
    runs += [(method, tree, False) for tree in variants]
    if method in config.get('typical', ()):
      runs.append((method, variants[-1], True))
  return runs


def _name(method: str, typical: bool, stats: dict) -> str:
  """The table's name of a record: the method's label, _typical, and its tree."""
  tree = f'({trees.label(stats["tree"])})' if 'tree' in stats else ''
  return registry.get(method).label + ('_typical' if typical else '') + tree


def _second_models(config) -> dict:
  """{method: restored second model (a draft, heads, or the method's own model)}."""
  from training import checkpoints
  second = {}
  for name in config.methods:
    method = registry.get(name)
    if method.second or method.own_model:
      workdir = config.get('workdirs', {}).get(name, '')
      if not workdir:
        raise ValueError(f'The {name} method needs config.workdirs.{name} (its '
                         f'{"model" if method.own_model else "second model"}).')
      second[name] = checkpoints.restore_model(workdir)
  return second


def run(config, workdir: str) -> list[dict]:
  """One record per model x method x batch size x temperature, each model's AR first:
  the target with every method that decodes it, then (if 'mtp' is in config.methods)
  the multi-token prediction model with its own AR and its self-speculation."""
  from launch import generation
  from training import checkpoints
  registry.load_plugins(config.get('plugins', ()))
  for name in config.methods:
    registry.get(name)  # Unknown names fail here, before any work.
  restored = checkpoints.restore_model(config.target_workdir)
  second = _second_models(config)
  # (model, its label, [(method, tree, typical)]): speedups are against that model's AR.
  on_target = [m for m in config.methods if not registry.get(m).own_model]
  suites = [(restored, '', _method_variants(config, on_target))]
  for name in config.methods:
    if registry.get(name).own_model:
      suites.append((second.pop(name), f'{name} model', _method_variants(config, [name])))
  # The same validation texts for every model, in each model's own tokens.
  prompts = {id(model): validation_prompts(model, config.num_prompts, config.prompt_len)
             for model, _, _ in suites}
  machine = {'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
             'devices': jax.device_count(), 'host': platform.processor() or platform.machine(),
             'cpu_count': os.cpu_count(), 'jax': jax.__version__}
  groups = [(b, t) for b in config.batch_sizes for t in config.temperatures]
  bar = tqdm.tqdm(total=len(groups) * sum(len(s[2]) for s in suites), desc='bench',
                  dynamic_ncols=True)
  records = []
  for batch_size, temperature in groups:
    options = generation.DecodeOptions(
        max_new_tokens=config.max_new_tokens, temperature=temperature, seed=config.seed,
        batch_size=batch_size, max_context=config.prompt_len + config.max_new_tokens,
        num_draft=config.num_draft, adaptive_threshold=config.adaptive_threshold,
        plugins=tuple(config.get('plugins', ())))
    for model, label, methods in suites:
      ar = None
      for method, tree, typical in methods:
        bar.set_postfix(method=method + tree, batch=batch_size, temperature=temperature)
        method_options = registry.options_for(
            registry.get(method), dataclasses.replace(options, tree=tree, typical=typical))
        completions, stats = generation.decode_tokens(
            model, prompts[id(model)], method, method_options, second.get(method),
            repeats=config.repeats)
        name = _name(method, typical, stats) + (
            f'({label})' if method == 'autoregressive' and label else '')
        bar.update(1)
        ar = ar or (completions, stats)
        lossless = stats['lossless']
        records.append(dict(
            method=name, lossless=lossless,
            batch_size=batch_size, temperature=temperature,
            mean_accepted=stats.get('mean_accepted', 1.0), target_calls=stats['target_calls'],
            draft_calls=stats.get('draft_calls', 0), new_tokens=stats['new_tokens'],
            wall_s=stats['wall_s'], tokens_per_s=stats['tokens_per_s'],
            speedup_vs_ar=stats['tokens_per_s'] / ar[1]['tokens_per_s'],
            compile_s=stats['compile_s'],
            matches_ar=(completions == ar[0]) if lossless and temperature == 0 else None,
            ar_agreement=(ar_agreement(restored.model, restored.params, prompts[id(restored)],
                                       ar[0], completions)
                          if lossless and temperature == 0 and model is restored else None),
            **machine))
      if model is restored:
        target_ar = ar
    if config.naive_reference and temperature == 0:
      naive = _naive_record(restored, prompts[id(restored)], config, batch_size, target_ar[0])
      naive['speedup_vs_ar'] = naive['tokens_per_s'] / target_ar[1]['tokens_per_s']
      records.append(dict(naive, batch_size=batch_size, temperature=temperature, **machine))
  bar.close()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'bench.json'), 'w') as f:
    json.dump(records, f, indent=1)
  table = markdown_table(records)
  with open(os.path.join(workdir, 'bench.md'), 'w') as f:
    f.write(table)
  plot(records, os.path.join(workdir, 'bench.png'))
  return records


def plot(records: list[dict], path: str) -> None:
  """Speedup over autoregressive and tau per method, one group of bars per
  (batch size, temperature)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  groups = sorted({(r['batch_size'], r['temperature']) for r in records})
  methods = list(dict.fromkeys(r['method'] for r in records))
  by_key = {(r['method'], r['batch_size'], r['temperature']): r for r in records}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / len(methods)
  for panel, (key, title) in zip(axes, (('speedup_vs_ar', 'wall-clock speedup vs AR'),
                                         ('mean_accepted', 'tokens per target call (tau)'))):
    for i, method in enumerate(methods):
      values = [by_key.get((method, b, t), {}).get(key, float('nan')) for b, t in groups]
      panel.bar([g + i * width for g in range(len(groups))], values, width, label=method)
    panel.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    panel.set_xticklabels([f'batch {b}\nT={t:g}' for b, t in groups])
    panel.set_title(title)
    if key == 'speedup_vs_ar':
      panel.axhline(1.0, color='black', linewidth=0.8)
  axes[0].legend(fontsize=8)
  machine = records[0]
  fig.suptitle(f'{machine["backend"]} ({machine["device"]}), JAX {machine["jax"]}')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown_table(records: list[dict]) -> str:
  cols = ['method', 'batch_size', 'temperature', 'lossless', 'matches_ar', 'ar_agreement',
          'mean_accepted',
          'target_calls', 'draft_calls', 'tokens_per_s', 'speedup_vs_ar', 'compile_s']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in records:
    cells = [f'{r.get(c):.2f}' if isinstance(r.get(c), float) else str(r.get(c)) for c in cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  machine = records[0]
  lines.append(f'\n{machine["backend"]} ({machine["device"]}, {machine["devices"]} device(s), '
               f'{machine["cpu_count"]} CPUs), JAX {machine["jax"]}')
  return '\n'.join(lines) + '\n'
