"""Orbax checkpoints of the train state and the data iterator, and the workdir's config.

Workdir layout:
  config.json        the config of the run (model and tokenizer must match on restart)
  tokenizer.json     (+ tokenizer.model) the tokenizer, saved before the first step
  checkpoints/<step>/{state,data}   orbax CheckpointManager items
  tb/                TensorBoard event files

Orbax writes a checkpoint into a temporary folder and renames it when complete,
so a save killed half-way leaves only a temporary folder, which the manager
ignores: restarting restores the last complete checkpoint.
"""
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from models import families, quant, transformer
from training import tokenizers

CONFIG_FILE = 'config.json'
# Config blocks that define the parameters; a workdir's checkpoint only fits these.
_MODEL_DEFINING = ('family', 'model', 'tokenizer')


class ConfigMismatchError(ValueError):
  pass


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def check_and_save_config(workdir: str, config, write: bool = True) -> None:
  """Refuses a workdir whose saved model config differs from `config`; then saves it
  (if `write`: in a multi-process run only process 0 writes)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  if os.path.exists(path) and has_checkpoint(workdir):
    with open(path) as f:
      saved = json.load(f)
    before = _flatten({k: saved.get(k) for k in _MODEL_DEFINING})
    now = _flatten({k: current.get(k) for k in _MODEL_DEFINING})
    diffs = [f'{k}: checkpoint has {before.get(k)!r}, config has {now.get(k)!r}'
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if diffs:
      raise ConfigMismatchError(
          f'Workdir {workdir} holds a checkpoint of a different model config:\n  '
          + '\n  '.join(diffs) + '\nUse a new --workdir or the matching config.')
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    f.write(config.to_json(indent=2))


def load_config(workdir: str):
  """The config a workdir was trained with (for decoding and benchmarks). Raises
  FileNotFoundError without one, ValueError naming the file when it is not JSON."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no {CONFIG_FILE}: not a training workdir.')
  with open(path) as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e.msg}, line {e.lineno} column '
                       f'{e.colno}).') from None


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def has_checkpoint(workdir: str) -> bool:
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def make_manager(workdir: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep, create=True,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def _tuples_restored(state):
  """grain's iterator states hold tuples (the packer's remainder slices), which JSON
  turns into lists; grain 0.2.18's own checkpoint handler hands the lists back and
  its packer then misreads them, so restored batches differ. Lists -> tuples."""
  if isinstance(state, dict):
    return {key: _tuples_restored(value) for key, value in state.items()}
  if isinstance(state, list):
    return tuple(_tuples_restored(value) for value in state)
  return state


def _all_processes_data_state(state: dict) -> dict:
  """A data.ShardedIterator state merged over every process ({'shards': {shard: state}}),
  so the one JSON item orbax writes (from process 0) holds every shard's position. A
  collective: every process calls it at the same step."""
  if jax.process_count() == 1:
    return state
  import numpy as np
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).ravel()
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  merged = {}
  for row, size in zip(rows, sizes):
    merged.update(json.loads(row[:size].tobytes())['shards'])
  return {'shards': merged}


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, force=False) -> bool:
  """Saves the train state (each process writes its shards of the global arrays) and
  the data position of every process's shards. A collective in multi-process runs."""
  return manager.save(step, force=force, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_all_processes_data_state(data_iterator.get_state()))))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the state (onto the shardings in `abstract_state`) and, if given, the
  data iterator's position in place."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items['data'] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if data_iterator is not None:
    data_iterator.set_state(_tuples_restored(restored['data']))
  return restored['state']


def save_params(workdir: str, params, step: int = 0) -> None:
  """A parameters-only checkpoint (imported weights): what restore_model reads. It holds
  no optimizer state, so training starts from it with --config.init_from=WORKDIR."""
  manager = make_manager(workdir, save_every=1, keep=1)
  try:
    manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params, 'step': step})))
  finally:
    manager.close()


@dataclasses.dataclass
class RestoredModel:
  """A trained model ready to decode: what launch.decode and launch.bench start from."""
  config: Any                  # the workdir's training config
  tokenizer: Any               # training.tokenizers.Tokenizer
  model: Any                   # the Flax module (e.g. models.Transformer)
  params: Any                  # its parameters (host arrays; place them with a mesh)
  step: int                    # the checkpoint's step
  workdir: str


def restore_model(workdir: str, step: int | None = None) -> RestoredModel:
  """Restores the parameters of the latest (or `step`) checkpoint and the tokenizer.

  The module comes from the family map (models/families.py), not from the objective:
  a Medusa or EAGLE workdir restores its heads alone, never its target. The checkpoint's
  parameter shapes are checked against those its config.json describes. Raises
  FileNotFoundError without a checkpoint (or the step), ValueError naming the step's
  directory when orbax cannot read it (incomplete or corrupt), ConfigMismatchError when
  its shapes are not the config's.
  """
  if not has_checkpoint(workdir):
    raise FileNotFoundError(f'Workdir {workdir} has no checkpoint (expected '
                            f'{checkpoint_dir(workdir)}/<step>/). Train one with '
                            'python -m launch.train or import one with python -m launch.convert.')
  config = load_config(workdir)
  tokenizer = tokenizers.load(workdir)
  model = families.build_module(config, tokenizer.vocab_size)
  manager = make_manager(workdir, save_every=1, keep=config.keep_checkpoints)
  try:
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f'Workdir {workdir} has no checkpoint at step {step}; it has '
                              f'{manager.all_steps()}.')
    try:
      try:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except ValueError as e:
        if 'Topology mismatch' not in str(e):
          raise
        # Written by a run over other devices (a multi-process run, a pod): read every
        # array whole onto this process's first device.
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
            _local_target(manager.item_metadata(step)['state']))))
    except (KeyError, ValueError, OSError, RuntimeError) as e:   # orbax's, on bad files
      detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f'The checkpoint {checkpoint_dir(workdir)}/{step} cannot be read '
                       f'(incomplete or corrupt?): {detail[:200]}') from None
  finally:
    manager.close()
  # Checkpoints written before the layer scan name each block; today's trunk stacks them.
  params = transformer.stack_layer_params(state['state']['params'])
  params = quant.compute_form(params)   # 4-bit weights held as int8 (models/quant.py)
  want = _shapes(families.abstract_params(config, tokenizer.vocab_size))
  got = _shapes(params)
  if want != got:
    diffs = [f'{k}: checkpoint {got.get(k)}, config {want.get(k)}'
             for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    raise ConfigMismatchError(f'The checkpoint in {workdir} does not match its config.json:\n  '
                              + '\n  '.join(diffs[:10]))
  return RestoredModel(config, tokenizer, model, params, int(step), workdir)


def _local_target(metadata):
  """A restore target for a checkpoint's array metadata: each array whole, on this
  process's first device; other leaves as saved."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
      if hasattr(m, 'shape') and hasattr(m, 'dtype') else m, metadata)


DTYPES = ('float32', 'bfloat16')


def with_dtype(restored: RestoredModel, dtype: str) -> RestoredModel:
  """`restored` decoded in `dtype` (float32 | bfloat16): floating parameters cast, and the
  module's config set to that activation and parameter dtype (so the KV cache and
  every activation follow; logits stay float32). A float32 checkpoint decodes in
  bfloat16 this way without re-importing it. The one place decode, bench and
  launch.trunk_cost change a model's dtype.
  Raises ValueError for another dtype or a module without a TransformerConfig."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; expected one of {", ".join(DTYPES)}.')
  config = getattr(restored.model, 'config', None)
  if not dataclasses.is_dataclass(config) or not hasattr(config, 'param_dtype'):
    raise ValueError(f'{type(restored.model).__name__} has no TransformerConfig to set a dtype in.')
  if config.dtype == config.param_dtype == dtype:
    return restored
  model = restored.model.clone(config=dataclasses.replace(config, dtype=dtype,
                                                          param_dtype=dtype))
  import jax.numpy as jnp
  # Quantized weights keep their scales (float16 GGUF scales are not rounded to bfloat16):
  # the trunk dequantizes in float32 and casts once (models/quant.py).
  params = jax.tree.map(lambda x: x if quant.is_quantized(x) else
                        x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        restored.params, is_leaf=quant.is_quantized)
  return dataclasses.replace(restored, model=model, params=params)


def _shapes(tree) -> dict:
  """{path: shape}; a quantized weight (models/quant.py) counts as its float weight."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
  return {jax.tree_util.keystr(path): quant.logical_shape(leaf) for path, leaf in leaves}
