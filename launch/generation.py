"""Text in, text out: decode prompts with a restored model and any decoding method.

Used by launch.decode and launch.bench:

    restored = checkpoints.restore_model(workdir)
    result = generation.decode_texts(restored, ['def main('], method='autoregressive',
                                     options=generation.DecodeOptions(max_new_tokens=32))
    result['outputs'][0]['completion'], result['stats']['tokens_per_s']
"""
import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from decoding import driver, registry
from decoding.sampling import SamplingConfig
from launch import tree_tuning
from models import sharding


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  max_new_tokens: int = 64
  temperature: float = 0.0      # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: int = 0
  batch_size: int = 0           # prompts per call; 0 = all of them (at most 8)
  max_context: int = 1024       # cache capacity limit: prompt + new tokens
  model_parallelism: int = 1    # size of the mesh's model axis
  num_draft: int = 4            # speculative chains: tokens drafted per round, at most
  adaptive_threshold: float = 0.0  # speculative chains: stop drafting after an unsure token
  # The draft tree, one name for every method that drafts one: children per depth
  # ('3,2,1'; Medusa/MTP: head d's top-b_d), sparse node paths ('paths:0;1;0.0'), or an
  # EAGLE-2 tree ('dynamic:TOP_K,DEPTH,BUDGET'). '' = the method's default: a chain for
  # speculative, the heads' tuned tree (launch.tune_tree) else 4,2,2 for medusa / mtp,
  # dynamic:4,5,24 for eagle.
  tree: str = ''
  typical: bool = False         # medusa, mtp: typical acceptance (LOSSY)
  plugins: tuple[str, ...] = ()  # modules that register more methods (decoding/registry.py)

  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p)


def read_prompt_file(path: str) -> list[str]:
  """One prompt per line; a line holding a JSON string is unescaped (for newlines)."""
  prompts = []
  with open(path) as f:
    for line in f.read().splitlines():
      prompts.append(json.loads(line) if line.startswith('"') else line)
  return prompts


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
  out = []
  for i, text in enumerate(texts):
    if not text:
      raise ValueError(f'Prompt {i} is empty: give some text to continue.')
    out.append([*tokenizer.bos_prefix, *tokenizer.encode(text).tolist()])
  return out


def check_draft(restored, draft) -> None:
  if draft is not None and draft.tokenizer.fingerprint() != restored.tokenizer.fingerprint():
    raise ValueError(f'The draft in {draft.workdir} uses another tokenizer than the target in '
                     f'{restored.workdir}; train the draft with '
                     f'--config.target_workdir={restored.workdir}.')


def decode_texts(restored, texts: list[str], method: str = 'autoregressive',
                 options: DecodeOptions = DecodeOptions(), draft=None) -> dict:
  """Decodes `texts` with `method`; returns the launch.decode JSON object as a dict.

  restored / draft: checkpoints.RestoredModel of the target and (speculative) the draft.
  """
  if not texts:
    raise ValueError('No prompts given.')
  tokenizer = restored.tokenizer
  completions, stats = decode_tokens(restored, encode_prompts(tokenizer, texts), method,
                                     options, draft)
  outputs = [{'prompt': text, 'completion': tokenizer.decode(ids), 'tokens': ids}
             for text, ids in zip(texts, completions)]
  return {'method': method, 'outputs': outputs, 'stats': stats}


def _build(restored, method: registry.Method, options: DecodeOptions, capacity: int, draft):
  """-> (the method's config, Drafter, target params) for `restored` and its second model."""
  method.check_model(restored.model)
  drafter = method.drafter(draft)
  if method.tuned_tree and not options.tree:
    # The tree tuned on validation data for these heads (launch.tune_tree), if any.
    tuned = tree_tuning.load_tuned_tree((draft or restored).workdir)
    options = dataclasses.replace(options, tree=tuned or '')
  config = method.make_config(options, capacity, restored.tokenizer.eos_ids, restored.model,
                              drafter.module)
  params = restored.params if drafter.target_params is None else drafter.target_params
  return config, drafter, params


def decode_tokens(restored, prompts: list[list[int]], method: str, options: DecodeOptions,
                  draft=None, repeats: int = 1) -> tuple[list[list[int]], dict]:
  """Decodes token prompts in batches of one shape (one compilation, excluded from
  wall_s). With repeats > 1 each batch runs that many times and the median counts.

  restored / draft: checkpoints.RestoredModel of the target and of the method's second
  model (a draft, heads), or None. Returns (new tokens per prompt, stats).
  Raises ValueError for an unknown method, bad options or prompts, a missing or wrong
  second model.
  """
  registry.load_plugins(options.plugins)
  entry = registry.get(method)
  options.sampling()  # Validates the sampling settings before any work.
  check_draft(restored, draft)
  tokenizer, model = restored.tokenizer, restored.model
  longest = max(len(p) for p in prompts)
  padded, lengths = driver.pad_prompts(prompts, tokenizer.pad_id)
  driver.check_prompts(padded, lengths, capacity=options.max_context,
                       vocab_size=model.config.vocab_size, max_new_tokens=options.max_new_tokens)
  # The cache holds what the longest prompt needs, within the context limit.
  capacity = min(options.max_context, longest + options.max_new_tokens)
  config, drafter, params = _build(restored, entry, options, capacity, draft)

  mesh = sharding.make_mesh(options.model_parallelism)
  data_size = mesh.shape['data']
  batch = options.batch_size or min(len(prompts), 8)
  batch = -(-batch // data_size) * data_size  # Whole rows per data shard.
  params = jax.device_put(params, sharding.param_shardings(model, mesh))
  drafter_params = drafter.params
  if drafter_params is not None:
    drafter_params = jax.device_put(drafter_params,
                                    sharding.param_shardings(drafter.module, mesh))
  rows, row_lengths = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  completions, stats = [], dict(new_tokens=0, target_calls=0, wall_s=0.0, compile_s=0.0)
  if getattr(config, 'tree', None) is not None:
    stats['tree'] = str(config.tree)
  histogram, draft_calls, compiled = None, 0, None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    for start in range(0, len(prompts), batch):
      chunk = list(range(start, min(start + batch, len(prompts))))
      fill = chunk + [chunk[0]] * (batch - len(chunk))  # Pad the last batch with copies.
      dynamic = dict(params=params, prompts=jax.device_put(padded[fill], rows),
                     prompt_lengths=jax.device_put(lengths[fill], row_lengths),
                     rng=jax.random.fold_in(jax.random.PRNGKey(options.seed), start),
                     drafter_params=drafter_params)
      if compiled is None:  # One compilation for every batch: they share one shape.
        t0 = time.perf_counter()
        compiled = driver.generate.lower(model=model, config=config, drafter=drafter.module,
                                         **dynamic).compile()
        stats['compile_s'] = time.perf_counter() - t0
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(**dynamic))
        times.append(time.perf_counter() - t0)
      stats['wall_s'] += statistics.median(times)
      new = out.completions()[:len(chunk)]
      completions += new
      stats['new_tokens'] += sum(len(c) for c in new)
      stats['target_calls'] += int(out.target_calls)
      if 'accepted_histogram' in out.stats:
        h = np.asarray(out.stats['accepted_histogram'])
        histogram = h if histogram is None else histogram + h
        draft_calls += int(out.stats['draft_calls'])
  stats['tokens_per_s'] = stats['new_tokens'] / max(stats['wall_s'], 1e-9)
  stats['lossless'] = entry.lossless(config)
  if histogram is not None:
    stats.update(mean_accepted=driver.mean_accepted(histogram), draft_calls=draft_calls,
                 accepted_histogram=histogram.tolist())
  return completions, stats
