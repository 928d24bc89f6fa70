"""The method registry: name -> how to build the method's config, which second model it
decodes with, whether it is lossless, and its label in tables.

launch.decode, launch.bench and launch.generation read only this table, so a new
method is one file (its config and proposer) plus one `register(Method(...))`, here or
in the researcher's own module loaded with --plugins=module.name.

Options are read duck-typed from `options` (launch.generation.DecodeOptions): the
sampling settings (`options.sampling()`), max_new_tokens, num_draft,
adaptive_threshold, chain_rule ('block' | 'token'), tree_rule ('rrsw' | 'specinfer'),
tree (one spec string for every method that drafts a tree:
"3,2,1", "paths:0;1;0.0", "dynamic:TOP_K,DEPTH,BUDGET"; '' = the method's default),
typical, lookup_max_ngram / lookup_min_ngram / lookup_branches (prompt lookup),
jacobi_window, lookahead_window / lookahead_ngram / lookahead_candidates (W, N, G), and
diffusion_steps / diffusion_sampler (block_diffusion), skip_layers / exit_layer
(self_speculative), infill (any_order, assd; num_draft is ASSD's k), exit_threshold /
exit_confidence / exit_layers (early_exit), block_size (parallel_draft: tokens per verified
block, 0 = the drafter's trained block; its tree is "best:BUDGET[,TOP_K]").
"""
import dataclasses
import importlib
from typing import Any, Callable, Optional

from decoding import (any_subset, autoregressive, block_diffusion, driver, eagle, early_exit,
                      jacobi, lookahead, lookup, medusa, parallel_drafter, self_speculative,
                      speculative, tidar, trees)


@dataclasses.dataclass(frozen=True)
class Drafter:
  """What a method decodes with besides the target: the second module and its
  parameters, and parameters that replace the target's (Medusa-2 trains both)."""
  module: Any = None
  params: Any = None
  target_params: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str                   # in tables and plots
  # (options, capacity, eos_ids, model, drafter module or None) -> driver.DecodeConfig
  make_config: Callable[..., driver.DecodeConfig]
  # The second workdir's flag (launch.decode --draft_workdir / --heads_workdir), or None.
  second: Optional[str] = None
  # (second: a restored model with .model, .params; or None) -> Drafter. Raises
  # ValueError when the second model is missing or of the wrong kind.
  drafter: Callable[[Any], Drafter] = lambda second: Drafter()
  # (the target model) -> None; raises ValueError when the method cannot decode it.
  check_model: Callable[[Any], None] = lambda model: None
  # The method decodes a model of its own (its workdir replaces the target), e.g. MTP.
  own_model: bool = False
  # The method's static tree may come from launch.tune_tree's file in the drafter's
  # (or own model's) workdir when options.tree is ''.
  tuned_tree: bool = False
  # The method drafts EAGLE-2 dynamic trees whose budget `--tree=auto` chooses from the
  # accepted nodes' reranking ranks (launch/autotune.py).
  dynamic_tree: bool = False
  # The method-specific fields of `options` this method reads (num_draft, tree, ...); a
  # method-specific field another method reads, set away from its default, is refused.
  options: tuple[str, ...] = ()
  # The option holding the method's chain draft length (num_draft, jacobi_window), which
  # may be 'auto' (launch/autotune.py: the cost model's choice); None = no such option.
  draft_length: Optional[str] = None
  # The longest draft length `auto` weighs (its calibration decodes at this length). A
  # drafter that costs calls per drafted token rarely has 8 accepted in a row; prompt
  # lookup drafts for free, and where the model copies (code editing) its runs of
  # accepted tokens outlast 8 (half the calibration rounds of SmolLM2's code edits
  # accepted all 8), so it weighs up to 16 (transformers' and llama.cpp's prompt lookup
  # draft 10).
  auto_max_draft: int = 8
  # The method samples a model family of its own (block diffusion): it reproduces no
  # autoregressive decoding, so it is never called lossless.
  own_family: bool = False
  # An own_model method's baseline on its own model in launch.bench (the decoding it is
  # exact with respect to): plain AR by default; ASSD's is sequential any-order decoding.
  reference: str = 'autoregressive'
  # (options, the target's workdir) -> options: settings the method reads from files in
  # the model's workdir when the options leave them unset (self_speculative's skip set).
  workdir_options: Optional[Callable[[Any, str], Any]] = None
  # Every call of the target after the prefill carries one token per row (plain and
  # early-exit decoding): a one-device CPU decode of one row then reads the block
  # weights in the 'rows' orientation of the decoding layout, every other decode (verify
  # calls of several tokens, several rows) in 'columns' (launch.generation.decode_tokens).
  one_token_calls: bool = False

  def lossless(self, config: driver.DecodeConfig) -> bool:
    """Every exact acceptance rule reproduces the target; lossy rules declare themselves."""
    return (config.acceptance is None and getattr(config, 'exact', True)
            and not self.own_family)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds (or replaces) a method; returns it."""
  METHODS[method.name] = method
  return method


def get(name: str) -> Method:
  """The method called `name`. Raises ValueError naming the known ones."""
  if name not in METHODS:
    raise ValueError(f'Unknown decoding method {name!r}; known: {", ".join(METHODS)}.')
  return METHODS[name]


def load_plugins(modules) -> None:
  """Imports each module name (they register their methods). Raises ValueError for a
  module that does not import."""
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f'Plugin module {name!r} does not import: {e}') from e


def check_options(method: Method, options) -> None:
  """Refuses an option meant for another method: a field some registered method lists
  in Method.options, set away from its default (`type(options)()`), that `method` does
  not read. Raises ValueError naming the option and the methods that take it."""
  defaults = type(options)()
  for name in sorted({o for m in METHODS.values() for o in m.options} - set(method.options)):
    if getattr(options, name, None) != getattr(defaults, name, None):
      takers = ', '.join(m.name for m in METHODS.values() if name in m.options)
      raise ValueError(f'--{name} is an option of {takers}, not of --method={method.name}.')


def options_for(method: Method, options):
  """`options` with every method-specific field `method` does not read reset to its
  default (a benchmark's shared settings, given to each method in turn)."""
  defaults = type(options)()
  others = {o for m in METHODS.values() for o in m.options} - set(method.options)
  return dataclasses.replace(options, **{o: getattr(defaults, o) for o in others
                                         if hasattr(defaults, o)})


def base_settings(options, capacity: int, eos_ids) -> dict:
  """The DecodeConfig fields every method shares, from `options`. max_new_tokens is
  capped at the capacity, which no row can pass anyway (its prompt holds a token), so a
  huge --max_new_tokens decodes to the context instead of overflowing int32 arithmetic."""
  return dict(max_new_tokens=min(options.max_new_tokens, capacity), cache_capacity=capacity,
              sampling=options.sampling(), eos_ids=tuple(eos_ids),
              prefill_chunk=getattr(options, 'prefill_chunk', driver.PREFILL_CHUNK))


def _autoregressive(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return autoregressive.AutoregressiveConfig(**base_settings(options, capacity, eos_ids))


def _speculative(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return speculative.SpeculativeConfig(
      **base_settings(options, capacity, eos_ids), num_draft=options.num_draft,
      adaptive_threshold=options.adaptive_threshold,
      tree=trees.parse(options.tree) if options.tree else None, chain_rule=options.chain_rule,
      tree_rule=options.tree_rule)


def _heads(options, capacity, eos_ids, model, drafter):
  num_heads = model.config.mtp_heads - 1 if drafter is None else drafter.num_heads
  tree = (trees.parse(options.tree) if options.tree
          else trees.TreeSpec(medusa.DEFAULT_TREE[:num_heads]))
  return medusa.MedusaConfig(**base_settings(options, capacity, eos_ids), tree=tree,
                             typical=options.typical, tree_rule=options.tree_rule)


def _eagle(options, capacity, eos_ids, model, drafter):
  if drafter is not None:
    eagle.check_drafter(model, drafter)
  # One tree syntax for every method: EAGLE's is "dynamic:TOP_K,DEPTH,BUDGET"; a static
  # spec is refused by EagleConfig rather than silently read as a dynamic one.
  tree = trees.parse(options.tree) if options.tree else eagle.EagleConfig.tree
  return eagle.EagleConfig(**base_settings(options, capacity, eos_ids), tree=tree,
                           tree_rule=options.tree_rule)


def _lookup(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return lookup.LookupConfig(**base_settings(options, capacity, eos_ids),
                             num_draft=options.num_draft, max_ngram=options.lookup_max_ngram,
                             min_ngram=options.lookup_min_ngram,
                             branches=options.lookup_branches)


def _jacobi(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return jacobi.JacobiConfig(**base_settings(options, capacity, eos_ids),
                             window=options.jacobi_window)


def _lookahead(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return lookahead.LookaheadConfig(
      **base_settings(options, capacity, eos_ids), window=options.lookahead_window,
      ngram=options.lookahead_ngram, candidates=options.lookahead_candidates)


def _block_diffusion(options, capacity, eos_ids, model, drafter):
  del drafter
  return block_diffusion.BlockDiffusionConfig(
      **base_settings(options, capacity, eos_ids), steps=options.diffusion_steps,
      sampler=options.diffusion_sampler, schedule=block_diffusion.NoiseSchedule())


def _any_order(options, capacity, eos_ids, model, drafter):
  del model, drafter
  return any_subset.AnyOrderConfig(**base_settings(options, capacity, eos_ids),
                                   infill=options.infill)


def _assd(options, capacity, eos_ids, model, drafter):
  del model, drafter
  if not isinstance(options.num_draft, int) or options.num_draft < 1:
    raise ValueError(f'--num_draft={options.num_draft} for assd must be an integer k >= 1 '
                     '(tokens drafted per round).')
  return any_subset.ASSDConfig(**base_settings(options, capacity, eos_ids),
                               infill=options.infill, draft=options.num_draft)


def _self_speculative(options, capacity, eos_ids, model, drafter):
  del drafter
  num_layers = model.config.num_layers
  if options.skip_layers and options.exit_layer:
    raise ValueError('Give --skip_layers or --exit_layer, not both.')
  if not isinstance(options.num_draft, int):
    raise ValueError(f'--num_draft={options.num_draft} for self_speculative must be a '
                     'positive integer.')
  exits = getattr(model.config, 'exit_layers', ())
  if options.skip_layers:
    skip = self_speculative.parse_skip(options.skip_layers)
  elif options.exit_layer or not exits:  # No skip set anywhere: exit at half depth.
    skip = self_speculative.exit_skip(options.exit_layer or max(num_layers // 2, 1),
                                      num_layers)
  else:  # An early-exit model: its trained exit nearest half depth (LayerSkip).
    skip = self_speculative.exit_skip(min(exits, key=lambda e: abs(e - num_layers / 2)),
                                      num_layers)
  self_speculative.check_skip(skip, num_layers)
  return self_speculative.SelfSpeculativeConfig(
      **base_settings(options, capacity, eos_ids), skip_layers=tuple(sorted(skip)),
      num_draft=options.num_draft)


def _tidar(options, capacity, eos_ids, model, drafter):
  del model, drafter
  # The model's own block (block_size - 1 drafts): the length it was trained to draft.
  return tidar.TidarConfig(**base_settings(options, capacity, eos_ids),
                           chain_rule=options.chain_rule)


def _early_exit(options, capacity, eos_ids, model, drafter):
  del drafter
  exits = (self_speculative.parse_skip(options.exit_layers, 'exit_layers')
           if options.exit_layers else ())
  exits = early_exit.check_model(model, exits)
  threshold = (early_exit.DEFAULT_THRESHOLD if options.exit_threshold is None
               else options.exit_threshold)
  return early_exit.EarlyExitConfig(
      **base_settings(options, capacity, eos_ids), threshold=threshold,
      confidence=options.exit_confidence, exit_layers=exits)


def _calibrated_threshold(options, workdir):
  """The threshold launch.calibrate_exit chose for this model and confidence measure
  (and exits), when the options give none."""
  if options.exit_threshold is not None:
    return options
  found = early_exit.load_calibration(workdir, options.exit_confidence, options.exit_layers)
  if found is None:
    return options
  return dataclasses.replace(options, exit_threshold=float(found['threshold']))


def _searched_skip(options, workdir):
  """The skip set (and its draft length, unless given) launch.skip_search chose for
  this model, when the options name none."""
  found = self_speculative.load_skip_layers(workdir)
  if options.skip_layers or options.exit_layer or found is None:
    return options
  changes = dict(skip_layers=','.join(map(str, found['skip_layers'])))
  if options.num_draft == type(options)().num_draft and 'num_draft' in found:
    changes['num_draft'] = int(found['num_draft'])
  return dataclasses.replace(options, **changes)


def _draft_model(second) -> Drafter:
  if second is None:
    raise ValueError('The speculative method needs a draft model (--draft_workdir).')
  return Drafter(second.model, second.params)


def _medusa_heads(second) -> Drafter:
  from models import MedusaHeads
  if second is None or not isinstance(second.model, MedusaHeads):
    raise ValueError('The medusa method needs a Medusa heads workdir (--heads_workdir), '
                     'trained with configs/medusa.py.')
  # Medusa-2: the target trained jointly with its heads is the model to decode.
  return Drafter(second.model, second.params['heads'], second.params.get('base'))


def _eagle_drafter(second, eagle3: bool = False) -> Drafter:
  from models import EagleDrafter
  name, config = ('eagle3', 'eagle3') if eagle3 else ('eagle', 'eagle')
  if (second is None or not isinstance(second.model, EagleDrafter)
      or bool(second.model.feature_layers) != eagle3):
    raise ValueError(f'The {name} method needs an {"EAGLE-3" if eagle3 else "EAGLE"} drafter '
                     f'workdir (--heads_workdir), trained with configs/{config}.py.')
  return Drafter(second.model, second.params)


def _parallel_draft(options, capacity, eos_ids, model, drafter):
  return parallel_drafter.make_config(base_settings(options, capacity, eos_ids),
                                      options.block_size, options.tree, model, drafter)


def _parallel_drafter(second) -> Drafter:
  from models import ParallelDrafter
  if second is None or not isinstance(second.model, ParallelDrafter):
    raise ValueError('The parallel_draft method needs a parallel drafter workdir '
                     '(--draft_workdir), trained with configs/parallel_drafter.py.')
  return Drafter(second.model, second.params)


def _has_mtp_heads(model) -> None:
  if model.config.mtp_heads < 2:
    raise ValueError('The mtp method needs a multi-token prediction model (trained with '
                     'configs/mtp.py: mtp_heads >= 2); this model predicts one token.')


register(Method('autoregressive', 'autoregressive', _autoregressive, one_token_calls=True))
register(Method('speculative', 'speculative', _speculative, second='draft_workdir',
                drafter=_draft_model,
                options=('num_draft', 'adaptive_threshold', 'tree', 'chain_rule', 'tree_rule'),
                draft_length='num_draft'))
register(Method('medusa', 'medusa', _heads, second='heads_workdir', drafter=_medusa_heads,
                tuned_tree=True, options=('tree', 'typical', 'tree_rule')))
register(Method('eagle', 'eagle', _eagle, second='heads_workdir', drafter=_eagle_drafter,
                dynamic_tree=True, options=('tree', 'tree_rule')))
# EAGLE-3: the same proposer and EAGLE-2 trees with a drafter on fused target layers.
register(Method('eagle3', 'eagle3', _eagle, second='heads_workdir',
                drafter=lambda second: _eagle_drafter(second, eagle3=True),
                dynamic_tree=True, options=('tree', 'tree_rule')))
register(Method('mtp', 'mtp', _heads, check_model=_has_mtp_heads, own_model=True,
                tuned_tree=True, options=('tree', 'typical', 'tree_rule')))
register(Method('lookup', 'lookup', _lookup,
                options=('num_draft', 'lookup_max_ngram', 'lookup_min_ngram', 'lookup_branches'),
                draft_length='num_draft', auto_max_draft=16))
register(Method('jacobi', 'jacobi', _jacobi, options=('jacobi_window',),
                draft_length='jacobi_window'))
register(Method('lookahead', 'lookahead', _lookahead,
                options=('lookahead_window', 'lookahead_ngram', 'lookahead_candidates')))
register(Method('block_diffusion', 'block diffusion (BD3-LM)', _block_diffusion,
                check_model=block_diffusion.check_model, own_model=True, own_family=True,
                options=('diffusion_steps', 'diffusion_sampler')))
register(Method('early_exit', 'CALM early exit (LOSSY)', _early_exit,
                check_model=lambda model: early_exit.check_model(model) and None,
                options=('exit_threshold', 'exit_confidence', 'exit_layers'),
                workdir_options=_calibrated_threshold, one_token_calls=True))
register(Method('parallel_draft', 'parallel draft', _parallel_draft, second='draft_workdir',
                drafter=_parallel_drafter, options=('block_size', 'tree')))
register(Method('self_speculative', 'self-speculative', _self_speculative,
                options=('num_draft', 'skip_layers', 'exit_layer'), draft_length='num_draft',
                workdir_options=_searched_skip))
# TiDAR: one model drafts by diffusion and verifies autoregressively in the same call.
register(Method('tidar', 'TiDAR', _tidar, check_model=tidar.check_model, own_model=True,
                options=('chain_rule',)))
# Any-subset AR models (decoding/any_subset.py): sequential any-order decoding and ASSD,
# exact with respect to it. Both decode the AS-ARM in --workdir; --infill fills the
# prompt's mask markers instead of continuing it.
# own_model: they decode their own family's model, never the AR target of a benchmark; in
# launch.bench ASSD's rows are measured against any-order decoding of the same model
# (launch.asarm_eval adds infilling and the AR comparison).
register(Method('any_order', 'any-order (sequential)', _any_order, own_model=True,
                check_model=any_subset.check_model, options=('infill',)))
register(Method('assd', 'ASSD', _assd, check_model=any_subset.check_model, own_model=True,
                options=('num_draft', 'infill'), reference='any_order'))
