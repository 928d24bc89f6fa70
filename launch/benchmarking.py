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

from decoding import trees



def validation_prompts(restored, num_prompts: int, prompt_len: int) -> list[list[int]]:
  """The first `prompt_len` tokens ([bos] + text) of validation documents long enough."""
  from training import data
  sources = data.load_sources(restored.config.data)
  tok, prompts = restored.tokenizer, []
  for text in sources['validation'].texts():
    ids = [*tok.bos_prefix, *tok.encode(text)[:prompt_len - len(tok.bos_prefix)].tolist()]
    if len(ids) == prompt_len:
      prompts.append(ids)
    if len(prompts) == num_prompts:
      return prompts
  raise ValueError(f'The validation split has fewer than {num_prompts} documents of '
                   f'{prompt_len} tokens.')


def naive_generate(model, params, prompts, lengths, max_new_tokens, capacity, eos_id):
  """Reference: the same prefill, then a Python loop calling a jitted one-token step and
  checking the stop condition on the host every token (greedy). -> (tokens [B, S], calls)."""
  from decoding import base
  prefill, step = _naive_steps(model, capacity)
  cache, tokens, lengths = prefill(params, prompts, lengths)
  limits = np.asarray(base.row_limits(lengths, max_new_tokens, capacity))
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
    return out.cache.replace(lengths=lengths), tokens, lengths + 1

  @jax.jit
  def step(params, cache, tokens, lengths, done):
    rows = jnp.arange(tokens.shape[0])
    out = model.apply({'params': params}, tokens[rows, lengths - 1][:, None],
                      (lengths - 1)[:, None], cache=cache)
    new = jnp.argmax(out.logits[:, 0, :model.config.vocab_size], -1)
    tokens = tokens.at[rows, jnp.where(done, capacity, lengths)].set(new, mode='drop')
    cache = out.cache.replace(lengths=jnp.where(done, cache.lengths, out.cache.lengths))
    return cache, tokens, lengths + (~done)

  return prefill, step


def _naive_record(restored, prompts, config, batch_size, ar_completions) -> dict:
  """The naive reference over the same prompts and batches (greedy)."""
  from decoding import base
  model, params = restored.model, jax.device_put(restored.params)
  capacity = config.prompt_len + config.max_new_tokens
  eos, wall, calls, first_s, completions = restored.tokenizer.eos_id, 0.0, 0, 0.0, []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded, lengths = base.pad_prompts(chunk + [chunk[0]] * (batch_size - len(chunk)))
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


def _method_variants(config) -> list[tuple[str, str]]:
  """(method, variant) pairs for the target: speculative once per entry of config.trees;
  medusa once per entry of config.medusa_trees ('' = the heads' tuned tree), and with
  typical acceptance (lossy) on the last one if config.medusa_typical; eagle once per
  entry of config.eagle_trees."""
  medusa_trees = tuple(config.get('medusa_trees', ('4,2,2',)))
  variants = {'speculative': tuple(config.trees),
              'medusa': medusa_trees + (('typical:' + medusa_trees[-1],)
                                        if config.get('medusa_typical') else ()),
              'eagle': tuple(config.get('eagle_trees', ('4,5,24',)))}
  return [('autoregressive', '')] + [
      (m, v) for m in config.methods if m not in ('autoregressive', 'mtp')
      for v in variants.get(m, ('',))]


def _options(options, method: str, variant: str):
  if method in ('medusa', 'mtp'):
    typical = variant.startswith('typical:')
    return dataclasses.replace(options, typical=typical,
                               heads_tree=variant[len('typical:'):] if typical else variant)
  if method == 'eagle':
    return dataclasses.replace(options, eagle_tree=variant)
  return dataclasses.replace(options, tree=variant)


def _name(method: str, options, stats: dict) -> str:
  """The table's name of a record: the method and the tree it used."""
  tree = trees.label(stats['tree']) if 'tree' in stats else ''
  if method in ('medusa', 'mtp'):
    return method + ('_typical' if options.typical else '') + f'({tree})'
  if method == 'eagle':
    return f'eagle({tree[len("dynamic:"):]})'
  return method + (f'_tree({tree})' if tree else '')


def run(config, workdir: str) -> list[dict]:
  """One record per model x method x batch size x temperature, each model's AR first:
  the target with every method that decodes it, then (if 'mtp' is in config.methods)
  the multi-token prediction model with its own AR and its self-speculation."""
  from launch import generation
  from training import checkpoints
  unknown = [m for m in config.methods if m not in generation.METHODS]
  if unknown:
    raise ValueError(f'Unknown methods {unknown}; known: {", ".join(generation.METHODS)}.')
  restored = checkpoints.restore_model(config.target_workdir)
  second = {}
  for method, key in (('speculative', 'draft_workdir'), ('medusa', 'heads_workdir'),
                      ('eagle', 'eagle_workdir'), ('mtp', 'mtp_workdir')):
    if method in config.methods:
      if not config.get(key, ''):
        raise ValueError(f'The {method} method needs config.{key}.')
      second[method] = checkpoints.restore_model(config[key])
  # (model, its label, [(method, variant)]): speedups are against that model's own AR.
  suites = [(restored, '', _method_variants(config))]
  if 'mtp' in config.methods:
    mtp_model = second.pop('mtp')
    suites.append((mtp_model, 'mtp model', [('autoregressive', '')] + [
        ('mtp', tree) for tree in config.get('mtp_trees', ('1,1,1', '4,2,2'))]))
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
        num_draft=config.num_draft, adaptive_threshold=config.adaptive_threshold)
    for model, label, methods in suites:
      ar = None
      for method, variant in methods:
        bar.set_postfix(method=method + variant, batch=batch_size, temperature=temperature)
        method_options = _options(options, method, variant)
        completions, stats = generation.decode_tokens(
            model, prompts[id(model)], method, method_options, second.get(method),
            repeats=config.repeats)
        name = _name(method, method_options, stats) + (
            f'({label})' if method == 'autoregressive' and label else '')
        bar.update(1)
        ar = ar or (completions, stats)
        lossless = generation.lossless(method, method_options)
        records.append(dict(
            method=name, lossless=lossless,
            batch_size=batch_size, temperature=temperature,
            mean_accepted=stats.get('mean_accepted', 1.0), target_calls=stats['target_calls'],
            draft_calls=stats.get('draft_calls', 0), new_tokens=stats['new_tokens'],
            wall_s=stats['wall_s'], tokens_per_s=stats['tokens_per_s'],
            speedup_vs_ar=stats['tokens_per_s'] / ar[1]['tokens_per_s'],
            compile_s=stats['compile_s'],
            matches_ar=(completions == ar[0]) if lossless and temperature == 0 else None,
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
  cols = ['method', 'batch_size', 'temperature', 'lossless', 'matches_ar', 'mean_accepted',
          'target_calls', 'draft_calls', 'tokens_per_s', 'speedup_vs_ar', 'compile_s']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in records:
    cells = [f'{r[c]:.2f}' if isinstance(r[c], float) else str(r[c]) for c in cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  machine = records[0]
  lines.append(f'\n{machine["backend"]} ({machine["device"]}, {machine["devices"]} device(s), '
               f'{machine["cpu_count"]} CPUs), JAX {machine["jax"]}')
  return '\n'.join(lines) + '\n'
