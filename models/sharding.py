"""Meshes and the logical-axis rule table shared by training and decoding.

Parameters and activations are annotated with logical axis names; the rule table
maps them to the mesh axes `data`, `fsdp` and `model`. Model code never names mesh axes.

The three mesh axes (every mesh has all three; an unused one has size 1):
  data   pure data parallelism: the batch is split, parameters are replicated.
  fsdp   fully-sharded data parallelism (ZeRO-3; Rajbhandari et al. 2020, "ZeRO", sec. 5;
         Zhao et al. 2023, "PyTorch FSDP"): the batch is split over it too, and every
         parameter (hence its gradient and optimizer state) is split along its `embed`
         dimension, so each device holds 1/fsdp of them; XLA's SPMD partitioner inserts
         the all-gather before a weight is used and the reduce-scatter of its gradient.
  model  tensor (Megatron) parallelism over heads, mlp and vocab.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'model')

# (logical axis, mesh axis), in priority order: flax gives a logical axis the first rule
# whose mesh axes the array's other dimensions have not taken. So an activation
# [batch, length, embed] gets batch -> (data, fsdp) and then embed -> None (fsdp is
# taken), while a weight [embed, mlp] gets embed -> fsdp. Unlisted logical axes are
# replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('mlp', 'model'),
    ('embed', 'fsdp'),
    ('embed', None),
    ('head_dim', None),
    ('length', None),
    ('cache_length', None),
    ('layers', None),      # the stacked blocks' leading axis (models/transformer.py)
)


def parse_mesh_shape(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'model': 1}. Axes left out have size 1,
  except `data`, which defaults to -1: whatever the other axes leave of the devices. At
  most one axis may be -1. Raises ValueError for an unknown axis or a bad size."""
  shape = {'data': -1, 'fsdp': 1, 'model': 1}
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, eq, value = part.partition('=')
    name = name.strip()
    if not eq or name not in shape:
      raise ValueError(f'mesh shape {text!r}: expected axis=size items with axes from '
                       f'{", ".join(MESH_AXES)}, got {part!r}.')
    try:
      shape[name] = int(value)
    except ValueError:
      raise ValueError(f'mesh shape {text!r}: size of {name} is not an integer.') from None
    if shape[name] == 0 or shape[name] < -1:
      raise ValueError(f'mesh shape {text!r}: the size of {name} must be >= 1 or -1.')
  if list(shape.values()).count(-1) > 1:
    raise ValueError(f'mesh shape {text!r}: at most one axis may be -1.')
  return shape


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None,
              shape: str = '') -> Mesh:
  """A 3-D (data, fsdp, model) mesh over `devices` (default: all devices, of every
  process: the global mesh of a multi-process run).

  shape: the mesh shape as parse_mesh_shape reads it ('fsdp=8', 'data=2,fsdp=4',
    'data=-1,model=2'); '' = (rest, 1, model_parallelism). Giving both a shape and
    model_parallelism > 1 is an error unless they agree.
  The devices fill the grid in order, so each process's devices are one contiguous block
  of the data (then fsdp) axis: a process's rows of a batch are one block of rows.
  Raises ValueError when the shape does not match the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not shape:
    if model_parallelism < 1 or len(devices) % model_parallelism:
      raise ValueError(
          f'model_parallelism={model_parallelism} must be >= 1 and divide the number of '
          f'devices ({len(devices)}).')
    sizes = {'data': len(devices) // model_parallelism, 'fsdp': 1, 'model': model_parallelism}
  else:
    sizes = parse_mesh_shape(shape)
    if model_parallelism > 1 and sizes['model'] != model_parallelism:
      raise ValueError(f'mesh shape {shape!r} has model={sizes["model"]} but '
                       f'model_parallelism={model_parallelism}; set one of them.')
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    rest = [k for k, v in sizes.items() if v == -1]
    if rest:
      if len(devices) % known:
        raise ValueError(f'mesh shape {shape!r} does not divide the {len(devices)} devices.')
      sizes[rest[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
      raise ValueError(
          f'mesh shape {shape!r} ({" x ".join(f"{k}={v}" for k, v in sizes.items())}) needs '
          f'{int(np.prod(list(sizes.values())))} devices; there are {len(devices)}.')
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: the data axis times the fsdp axis."""
  return int(mesh.shape['data'] * mesh.shape.get('fsdp', 1))


def _drop_unit_fsdp(axis, mesh: Mesh):
  """`axis` (a mesh axis, a tuple of them or None) without an fsdp axis of size 1, so
  specs read as before fsdp existed when it is unused."""
  if mesh.shape.get('fsdp', 1) != 1 or axis is None:
    return axis
  if axis == 'fsdp':
    return None
  if isinstance(axis, tuple):
    kept = tuple(a for a in axis if a != 'fsdp')
    return kept[0] if len(kept) == 1 else (kept or None)
  return axis


def _mesh_spec(logical_spec, shape, mesh: Mesh, rules) -> PartitionSpec:
  """Logical spec -> mesh spec, replicating dimensions the mesh axis does not divide."""
  if logical_spec is None:
    return PartitionSpec()
  mesh_axes = nn.logical_to_mesh_axes(logical_spec, rules)
  safe = []
  for dim, axis in zip(shape, mesh_axes):
    axis = _drop_unit_fsdp(axis, mesh)
    axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    safe.append(axis if axes and dim % size == 0 else None)
  return PartitionSpec(*safe)


def logical_to_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

  The result has the structure of the *unboxed* tree. Leaves without logical
  annotations are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  unboxed = nn.meta.unbox(abstract_tree)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _mesh_spec(spec, np.shape(leaf), mesh, rules)),
      logical_specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding for a [B, ...] array: batch over `data` (and `fsdp`), the rest replicated."""
  axis = _drop_unit_fsdp(('data', 'fsdp'), mesh) if 'fsdp' in mesh.shape else 'data'
  return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def bytes_per_device(tree) -> dict[int, int]:
  """{device id: bytes of `tree`'s arrays that device holds} (its own shards only; a
  replicated array counts once per device). For reporting parameter memory per device."""
  held: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, 'addressable_shards', ()):
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held


def param_shardings(model: nn.Module, mesh: Mesh, rules=DEFAULT_RULES, params=None):
  """NamedShardings for `model`'s parameters (the unboxed 'params' tree).

  params: the parameters to place, needed when they hold quantized weights
  (models/quant.py): each of a weight's int values, scales and mins then gets the float
  weight's layout, a dimension the mesh axis does not divide (a scale's size-1 or
  grouped axes) replicated."""
  tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
  inputs = model.example_inputs() if hasattr(model, 'example_inputs') else (tokens, tokens)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)['params']
  shardings = logical_to_shardings(boxed, mesh, rules)
  if params is None:
    return shardings
  from models import quant

  def follow(sharded, value):
    if quant.is_quantized(value):
      return {key: NamedSharding(mesh, _divisible(sharded.spec, part.shape, mesh))
              for key, part in value.items()}
    if isinstance(value, dict):
      return {key: follow(sharded[key], part) for key, part in value.items()}
    return sharded
  return follow(shardings, params)


def _divisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """`spec` with the mesh axes of dimensions they do not divide replaced by None."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axis = _drop_unit_fsdp(axis, mesh)
    axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(axis if axes and dim % size == 0 else None)
  return PartitionSpec(*out)
