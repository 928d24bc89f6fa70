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
import jax.numpy as jnp
import numpy as np

from decoding import autoregressive, base, eagle, medusa, speculative, trees
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
  num_draft: int = 4            # speculative: tokens drafted per round, at most
  adaptive_threshold: float = 0.0  # speculative: stop drafting after an unsure token
  tree: str = ''                # speculative: '' = chain, a static tree like '3,2,1', or
                                # an EAGLE-2 tree 'dynamic:TOP_K,DEPTH,BUDGET'
  heads_tree: str = ''          # medusa, mtp: children per depth (head d's top-b_d tokens)
                                # or sparse 'paths:...'; '' = the heads' tuned tree
                                # (launch.tune_tree), else 4,2,2 cut to the heads
  typical: bool = False         # medusa, mtp: typical acceptance (LOSSY)
  eagle_tree: str = '4,5,24'    # eagle: EAGLE-2 tree TOP_K,DEPTH,BUDGET

  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p)


def _autoregressive(model, draft, options, capacity, eos_ids):
  del draft
  config = autoregressive.AutoregressiveConfig(
      max_new_tokens=options.max_new_tokens, cache_capacity=capacity,
      sampling=options.sampling(), eos_ids=eos_ids)
  return autoregressive.generate, {'model': model, 'config': config}, {}


def _speculative(model, draft, options, capacity, eos_ids):
  if draft is None:
    raise ValueError('The speculative method needs a draft model (--draft_workdir).')
  config = speculative.SpeculativeConfig(
      max_new_tokens=options.max_new_tokens, cache_capacity=capacity,
      num_draft=options.num_draft, sampling=options.sampling(), eos_ids=eos_ids,
      adaptive_threshold=options.adaptive_threshold,
      tree=trees.parse(options.tree) if options.tree else None)
  return (speculative.generate, {'model': model, 'draft_model': draft.model, 'config': config},
          {'draft_params': draft.params})


def _heads_config(options, capacity, eos_ids, num_heads: int) -> medusa.MedusaConfig:
  tree = (trees.parse(options.heads_tree) if options.heads_tree
          else trees.TreeSpec(medusa.DEFAULT_TREE[:num_heads]))
  if not isinstance(tree, (trees.TreeSpec, trees.SparseTree)):
    raise ValueError(f'Draft heads fill a static tree (like "4,2,2" or "paths:0;1;0.0"); '
                     f'got {options.heads_tree!r}.')
  return medusa.MedusaConfig(
      max_new_tokens=options.max_new_tokens, cache_capacity=capacity, tree=tree,
      sampling=options.sampling(), eos_ids=eos_ids, typical=options.typical)


def _medusa(model, heads, options, capacity, eos_ids):
  from models import MedusaHeads
  if heads is None or not isinstance(heads.model, MedusaHeads):
    raise ValueError('The medusa method needs a Medusa heads workdir (--heads_workdir), '
                     'trained with configs/medusa.py.')
  config = _heads_config(options, capacity, eos_ids, heads.model.num_heads)
  extra = {'heads_params': heads.params['heads']}
  if 'base' in heads.params:  # Medusa-2: the target trained with its heads is the model.
    extra['params'] = heads.params['base']
  return medusa.generate, {'model': model, 'heads': heads.model, 'config': config}, extra


def _mtp(model, second, options, capacity, eos_ids):
  del second
  if model.config.mtp_heads < 2:
    raise ValueError('The mtp method needs a multi-token prediction model (trained with '
                     'configs/mtp.py: mtp_heads >= 2); this model predicts one token.')
  config = _heads_config(options, capacity, eos_ids, model.config.mtp_heads - 1)
  return (medusa.generate, {'model': model, 'heads': None, 'config': config},
          {'heads_params': None})


def _eagle(model, drafter, options, capacity, eos_ids):
  from models import EagleDrafter
  if drafter is None or not isinstance(drafter.model, EagleDrafter):
    raise ValueError('The eagle method needs an EAGLE drafter workdir (--heads_workdir), '
                     'trained with configs/eagle.py.')
  spec = options.eagle_tree
  tree = trees.parse(spec if spec.startswith('dynamic:') else f'dynamic:{spec}')
  config = eagle.EagleConfig(max_new_tokens=options.max_new_tokens, cache_capacity=capacity,
                             tree=tree, sampling=options.sampling(), eos_ids=eos_ids)
  return (eagle.generate, {'model': model, 'drafter': drafter.model, 'config': config},
          {'drafter_params': drafter.params})


# name -> builder of (jitted generate, its static keyword arguments, extra dynamic
# parameter trees, which may replace `params`). The other dynamic arguments are always
# params, prompts, prompt_lengths and rng. The second model (a draft, or heads) is
# passed as `draft`.
METHODS = {'autoregressive': _autoregressive, 'speculative': _speculative, 'medusa': _medusa,
           'eagle': _eagle, 'mtp': _mtp}
# The methods that decode with a second workdir: the flag naming it.
SECOND_MODEL = {'speculative': 'draft_workdir', 'medusa': 'heads_workdir',
                'eagle': 'heads_workdir'}


def lossless(method: str, options: DecodeOptions) -> bool:
  """Every method reproduces the target exactly except typical acceptance (LOSSY)."""
  return not (method in ('medusa', 'mtp') and options.typical)


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


def decode_tokens(restored, prompts: list[list[int]], method: str, options: DecodeOptions,
                  draft=None, repeats: int = 1) -> tuple[list[list[int]], dict]:
  """Decodes token prompts in batches of one shape (one compilation, excluded from
  wall_s). With repeats > 1 each batch runs that many times and the median counts.

  Returns (new tokens per prompt, stats).
  """
  if method not in METHODS:
    raise ValueError(f'Unknown decoding method {method!r}; known: {", ".join(METHODS)}.')
  options.sampling()  # Validates the sampling settings before any work.
  check_draft(restored, draft)
  tokenizer, model = restored.tokenizer, restored.model
  longest = max(len(p) for p in prompts)
  padded, lengths = base.pad_prompts(prompts, tokenizer.pad_id)
  base.check_prompts(padded, lengths, capacity=options.max_context,
                     vocab_size=model.config.vocab_size, max_new_tokens=options.max_new_tokens)
  # The cache holds what the longest prompt needs, within the context limit.
  capacity = min(options.max_context, longest + options.max_new_tokens)

  mesh = sharding.make_mesh(options.model_parallelism)
  data_size = mesh.shape['data']
  batch = options.batch_size or min(len(prompts), 8)
  batch = -(-batch // data_size) * data_size  # Whole rows per data shard.
  params = jax.device_put(restored.params, sharding.param_shardings(model, mesh))
  rows, row_lengths = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)

  if method in ('medusa', 'mtp') and not options.heads_tree:
    # The tree tuned on validation data for these heads (launch.tune_tree), if any.
    tuned = tree_tuning.load_tuned_tree((draft or restored).workdir)
    if tuned:
      options = dataclasses.replace(options, heads_tree=tuned)
  fn, static, extra = METHODS[method](model, draft, options, capacity, tokenizer.eos_ids)
  if draft is not None and extra:
    extra = {name: jax.device_put(tree, sharding.param_shardings(
        model if name == 'params' else draft.model, mesh)) for name, tree in extra.items()}
  completions, stats = [], dict(new_tokens=0, target_calls=0, wall_s=0.0, compile_s=0.0)
  if getattr(static['config'], 'tree', None) is not None:
    stats['tree'] = str(static['config'].tree)
  histogram, draft_calls = None, 0
  compiled = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    for start in range(0, len(prompts), batch):
      chunk = list(range(start, min(start + batch, len(prompts))))
      fill = chunk + [chunk[0]] * (batch - len(chunk))  # Pad the last batch with copies.
      dynamic = dict(params=params, prompts=jax.device_put(padded[fill], rows),
                     prompt_lengths=jax.device_put(lengths[fill], row_lengths),
                     rng=jax.random.fold_in(jax.random.PRNGKey(options.seed), start))
      dynamic.update(extra)
      if compiled is None:  # One compilation for every batch: they share one shape.
        t0 = time.perf_counter()
        compiled = fn.lower(**static, **dynamic).compile()
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
  if histogram is not None:
    stats.update(mean_accepted=speculative.mean_accepted(histogram), draft_calls=draft_calls,
                 accepted_histogram=histogram.tolist())
  return completions, stats
