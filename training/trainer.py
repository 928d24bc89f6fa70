"""The one trainer: every model family trains through `train(config, workdir)`.

Phases: set-up (mesh, data, tokenizer, objective, optimizer), state from shapes or
from the last checkpoint, the step loop (train step, eval, checkpoint, logging).
"""
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from models import families, sharding
from training import checkpoints, data, objectives, tokenizers

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # [] int32, optimizer steps taken
  params: Any            # the objective's parameters
  opt_state: Any         # optax state
  rng: jax.Array         # base key; the key of step n is fold_in(rng, n)


class TrainingDivergedError(FloatingPointError):
  pass


def make_optimizer(config, trainable: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, global-norm clipping.

  `trainable` is a tree of bools shaped like the params; frozen leaves get no update.
  """
  # A run shorter than its warmup still needs a valid schedule.
  warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction)
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                  weight_decay=config.weight_decay,
                  mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()}, labels)


@dataclasses.dataclass
class Setup:
  """Everything the step loop needs, built once from the config."""
  objective: objectives.Objective
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_shardings: Any
  abstract_state: Any        # TrainState of ShapeDtypeStructs carrying their shardings
  batch_shardings: Any       # of a training batch
  init_state: Callable[[], TrainState]
  train_step: Callable     # (state, batch, frozen) -> (state, metrics)
  eval_step: Callable      # (params, batch, frozen) -> metric sums
  frozen: Any              # the objective's frozen parameters on the mesh (or None)
  eval_batch_shardings: Any = None   # of an eval batch (its structure may differ)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The training mesh: config.mesh.shape ('fsdp=8', 'data=2,fsdp=4', ...) or, without
  one, data x config.model_parallelism; over all processes' devices by default. Raises
  ValueError when the shape does not match the device count."""
  shape = config.get('mesh', {}).get('shape', '') if 'mesh' in config else ''
  try:
    return sharding.make_mesh(config.model_parallelism, devices, shape=shape)
  except ValueError as e:
    raise ValueError(f'config.mesh.shape / model_parallelism: {e}') from None


def build(config, objective: objectives.Objective, example_batch: dict,
          devices=None, rules=sharding.DEFAULT_RULES, eval_example: Optional[dict] = None
          ) -> Setup:
  """Mesh, shardings from the logical axis rules, jitted init / train / eval steps.

  example_batch: a training batch (init's shapes, the train step's batch shardings);
  eval_example: an eval batch where its structure differs (default: example_batch).
  """
  mesh = make_mesh(config, devices)
  if config.batch_size % sharding.data_parallel_size(mesh):
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the mesh\'s data '
                     f'axes (data x fsdp = {sharding.data_parallel_size(mesh)} devices).')
  rng = jax.random.PRNGKey(config.seed)
  boxed = jax.eval_shape(objective.init, rng, example_batch)
  param_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  optimizer = make_optimizer(config, objective.trainable(abstract_params))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))
  replicated = sharding.replicated(mesh)
  state_shardings = TrainState(step=replicated, params=param_shardings,
                               opt_state=opt_shardings, rng=replicated)
  def shardings_of(batch):
    return jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x)), batch)
  batch_shardings = shardings_of(example_batch)
  eval_shardings = shardings_of(example_batch if eval_example is None else eval_example)
  frozen_shardings = None
  if objective.frozen_params is not None:
    frozen_shardings = sharding.param_shardings(objective.frozen_model, mesh, rules)

  def init_state(frozen):
    params = objective.warm_start(nn.meta.unbox(objective.init(rng, example_batch)), frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.fold_in(rng, 1))

  def train_step(state: TrainState, batch: dict, frozen):
    step_rng = jax.random.fold_in(state.rng, state.step)
    (loss, sums), grads = objective.loss_and_grad(state.params, batch, step_rng, state.step,
                                                  frozen)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, rng=state.rng)
    # A non-finite step leaves the state untouched, so nothing bad can be checkpointed.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite, **sums}

  def eval_step(params, batch, frozen):
    return objective.eval_sums(params, batch, rng, jnp.zeros((), jnp.int32), frozen)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jit_init = jax.jit(init_state, in_shardings=(frozen_shardings,),
                       out_shardings=state_shardings)
    jit_train = jax.jit(train_step,
                        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(param_shardings, eval_shardings,
                                                frozen_shardings), out_shardings=replicated)
  frozen = None
  if objective.frozen_params is not None:
    frozen = jax.device_put(objective.frozen_params, frozen_shardings)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_state, frozen), state_shardings)

  def under_rules(fn):
    """Calls (and `.lower`s) `fn` with the mesh and the logical rules in scope, which
    the model's activation sharding constraints need while tracing."""
    def call(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args)
    call.lower = under_rules(fn.lower) if hasattr(fn, 'lower') else None
    return call

  return Setup(objective, optimizer, mesh, state_shardings, abstract_state, batch_shardings,
               under_rules(lambda: jit_init(frozen)), under_rules(jit_train),
               under_rules(jit_eval), frozen, eval_shardings)


def to_device(batch: dict, shardings) -> dict:
  """A host batch (this process's rows) -> global arrays sharded over the mesh."""
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, shardings)


def evaluate(setup: Setup, params, source, tokenizer, config) -> dict:
  """Validation loss (nats/token), perplexity and bits per byte, over the first
  config.eval_batches global batches (each process evaluating its shards' rows)."""
  totals = None
  for batch in _eval_batches(source, tokenizer, config, config.eval_batches):
    sums = setup.eval_step(params, to_device(batch, setup.eval_batch_shardings), setup.frozen)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The validation split is too small for one eval batch '
                     f'({config.batch_size} x {config.seq_len} tokens).')
  return objectives.summarize(jax.device_get(totals))


def _data_shards(config) -> tuple[int, range]:
  return data.data_shards(config.data.get('num_shards', 0), config.batch_size,
                          jax.process_index(), jax.process_count())


def _eval_batches(source, tokenizer, config, num_batches: int) -> list:
  """This process's rows of the first `num_batches` validation batches; every process
  gets the same number of them (each eval step is a collective)."""
  num_shards, shards = _data_shards(config)
  batches = data.sharded_eval_batches(source, tokenizer, batch_size=config.batch_size,
                                      seq_len=config.seq_len, num_batches=num_batches,
                                      num_shards=num_shards, shards=shards)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    fewest = int(multihost_utils.process_allgather(np.int32(len(batches))).min())
    batches = batches[:fewest]
  return batches


def _first_process_first(fn: Callable[[], Any], name: str) -> Any:
  """fn() in process 0, then (after a barrier) in the others: for work on shared files
  (preparing a TFDS dataset, writing the tokenizer) that must not race."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f'fastdecode:{name}')
  return result if jax.process_index() == 0 else fn()


def prepare_tokenizer(config, workdir: str, train_source) -> tokenizers.Tokenizer:
  """The workdir's tokenizer; a new one (trained for BPE) when the run starts fresh."""
  if checkpoints.has_checkpoint(workdir):
    return tokenizers.load(workdir)  # A checkpoint only fits its own tokenizer.
  # A draft shares its target's tokenizer; a run initialised from a workdir, its.
  source_workdir = config.get('target_workdir', '') or config.get('init_from', '')
  if source_workdir:
    tokenizer = tokenizers.load(source_workdir)
    tokenizer.save(workdir)
    return tokenizer
  spec = config.tokenizer
  if tokenizers.exists(workdir):
    tokenizer = tokenizers.load(workdir)
    same_kind = isinstance(tokenizer, tokenizers.ByteTokenizer) == (spec.kind == 'byte')
    if same_kind and (spec.kind == 'byte' or tokenizer.vocab_size == spec.vocab_size):
      return tokenizer
  log.info('Creating a %s tokenizer for %s', spec.kind, workdir)
  tokenizer = tokenizers.create(spec.kind, spec.vocab_size, train_source.texts())
  tokenizer.save(workdir)
  return tokenizer


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  eval_metrics: dict             # last evaluation
  eval_history: list             # [(step, metrics)], including step 0 of a fresh run
  compile_s: Optional[float]     # train step compile time (None if nothing ran)
  tokens_per_s: Optional[float]  # training throughput after compilation


def train(config, workdir: str, *, objective: Optional[objectives.Objective] = None,
          step_callback: Optional[Callable[[int, dict, dict], None]] = None,
          devices=None, progress: bool = True) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its last checkpoint if there is one.

  step_callback(step, metrics, host_batch) runs on the host after every step.
  """
  if checkpoints.has_checkpoint(workdir) and checkpoints.load_config(workdir).get('imported_from'):
    raise ValueError(f'{workdir} holds imported weights without optimizer state; train in a '
                     f'new workdir with --config.init_from={workdir}.')
  # The initial parameters fix the model and tokenizer; draft heads read their target's.
  model_source = config.get('init_from', '') or (
      config.get('target_workdir', '') if config.family in families.HEADS_FAMILIES else '')
  if model_source:
    source = checkpoints.load_config(model_source)
    with config.unlocked():
      config.model = source.model
      config.tokenizer = source.tokenizer
    log.info('Model and tokenizer config taken from %s', model_source)
  num_shards, shards = _data_shards(config)  # Bad batch / process counts fail here.
  make_mesh(config, devices)                  # So does a mesh shape of other devices.
  checkpoints.check_and_save_config(workdir, config, write=jax.process_index() == 0)
  sources = _first_process_first(lambda: data.load_sources(config.data), 'data')
  tokenizer = _first_process_first(
      lambda: prepare_tokenizer(config, workdir, sources['train']) if jax.process_index() == 0
      else tokenizers.load(workdir), 'tokenizer')
  objective = objective or objectives.build(config, tokenizer.vocab_size)

  per_shard = config.batch_size // num_shards
  own_data = objective.train_dataset(per_shard, config.seed, 0, num_shards)
  if own_data is not None:
    train_data = data.ShardedBatches(
        lambda s, n: objective.train_dataset(per_shard, config.seed, s, n), num_shards, shards)
  else:
    train_data = data.ShardedBatches(lambda s, n: data.train_dataset(
        sources['train'], tokenizer, batch_size=per_shard, seq_len=config.seq_len,
        seed=config.seed, rows_shuffle_window=config.data.rows_shuffle_window,
        process_index=s, process_count=n), num_shards, shards)
  data_iter = iter(train_data)
  example = next(iter(_eval_batches(sources['validation'], tokenizer, config, 1)), None)
  if example is None:
    example = next(iter(train_data))
  if own_data is None:
    setup = build(config, objective, example, devices)
  else:  # Training batches of another structure (e.g. Jacobi trajectories).
    peek = iter(train_data)
    train_example = next(peek)
    peek.close()
    setup = build(config, objective, train_example, devices, eval_example=example)

  manager = checkpoints.make_manager(workdir, save_every=config.checkpoint_every_steps,
                                     keep=config.keep_checkpoints)
  writer = _summary_writer(workdir)
  try:
    # Resume order: model state first (its step fixes the step rngs), then the data
    # iterator's position, so the next batch is the one the killed run would have used.
    latest = manager.latest_step()
    if latest is None:
      state = setup.init_state()
      if config.get('init_from', ''):
        state = _params_from(config.init_from, state, setup)
      log.info('Initialised %s parameters', f'{_count(state.params):,}')
    else:
      state = checkpoints.restore(manager, latest, setup.abstract_state, data_iter)
      log.info('Restored step %d from %s', latest, manager.directory)
    return _loop(config, setup, state, data_iter, sources['validation'], tokenizer, manager,
                 writer, step_callback, progress)
  finally:
    manager.close()
    writer.close()
    data_iter.close()


def _params_from(workdir: str, state: TrainState, setup: Setup) -> TrainState:
  """A fresh state whose parameters come from `workdir` (shapes checked, cast to ours)."""
  restored = checkpoints.restore_model(workdir)
  want = checkpoints._shapes(state.params)
  got = checkpoints._shapes(restored.params)
  if want != got:
    diffs = [f'{k}: {workdir} has {got.get(k)}, this config {want.get(k)}'
             for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    raise checkpoints.ConfigMismatchError(
        f'init_from={workdir} does not fit this config\'s model:\n  ' + '\n  '.join(diffs[:10]))
  params = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                        restored.params, state.params)
  log.info('Parameters from %s (step %d)', workdir, restored.step)
  return state.replace(params=params)


def _loop(config, setup, state, data_iter, validation, tokenizer, manager, writer,
          step_callback, progress) -> TrainResult:
  step = int(state.step)
  eval_metrics, compile_s, tokens_per_s, history = {}, None, None, []
  if step == 0:  # The loss at initialisation, as a reference point.
    eval_metrics = evaluate(setup, state.params, validation, tokenizer, config)
    history.append((0, eval_metrics))
    log.info('step 0: %s', _format(eval_metrics))
  progress = progress and jax.process_index() == 0  # One progress bar per run.
  bar = tqdm.tqdm(total=config.num_train_steps, initial=step, disable=not progress,
                  dynamic_ncols=True, desc='train')
  tokens_per_step = config.batch_size * config.seq_len
  train_step = None
  last_log_time, last_log_step, pending = None, step, None
  while step < config.num_train_steps:
    host_batch = next(data_iter)
    batch = to_device(host_batch, setup.batch_shardings)
    if train_step is None:
      t0 = time.perf_counter()
      train_step = setup.train_step.lower(state, batch, setup.frozen).compile()
      compile_s = time.perf_counter() - t0
      writer.add_scalar('perf/compile_s', compile_s, step)
      log.info('Train step compiled in %.1fs', compile_s)
      last_log_time = time.perf_counter()
    with jax.set_mesh(setup.mesh):
      state, metrics = train_step(state, batch, setup.frozen)
    # Check the previous step while this one runs: no stall per step.
    if pending is not None:
      _check_finite(*pending, manager)
    pending = (step + 1, metrics)
    step += 1
    if step_callback is not None:
      step_callback(step, metrics, host_batch)
    bar.update(1)

    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      _check_finite(*pending, manager)
      now = time.perf_counter()
      tokens_per_s = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      m = jax.device_get(metrics)
      bar.set_postfix(loss=f'{float(m["loss"]):.3f}', tok_s=f'{tokens_per_s:,.0f}')
      for key in ('loss', 'grad_norm'):
        writer.add_scalar(f'train/{key}', float(m[key]), step)
      writer.add_scalar('train/tokens_per_s', tokens_per_s, step)
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      eval_metrics = evaluate(setup, state.params, validation, tokenizer, config)
      history.append((step, eval_metrics))
      for key, value in eval_metrics.items():
        writer.add_scalar(f'eval/{key}', value, step)
      if jax.process_index() == 0:
        bar.write(f'step {step}: {_format(eval_metrics)}')
      last_log_time, last_log_step = time.perf_counter(), step  # Eval is not training time.
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
      _check_finite(*pending, manager)
      checkpoints.save(manager, step, state, data_iter, force=True)
  bar.close()
  writer.flush()
  return TrainResult(state, eval_metrics, history, compile_s, tokens_per_s)


def _format(metrics: dict) -> str:
  return ', '.join(f'eval {k} {v:.4f}' for k, v in metrics.items())


def _check_finite(step: int, metrics: dict, manager) -> None:
  if not bool(metrics['finite']):
    last = manager.latest_step()
    raise TrainingDivergedError(
        f'Training loss became non-finite at step {step} (loss={float(metrics["loss"])}, '
        f'grad_norm={float(metrics["grad_norm"])}). Stopped without saving; the last good '
        f'checkpoint is step {last} in {manager.directory}. Lower the learning rate or '
        'check the data, then rerun the same command to resume from it.')


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


class _NullWriter:
  def add_scalar(self, *args, **kwargs): pass
  def flush(self): pass
  def close(self): pass


def _summary_writer(workdir: str):
  if jax.process_index() != 0:
    return _NullWriter()
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, 'tb'))
