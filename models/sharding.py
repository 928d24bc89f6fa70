"""Meshes and the logical-axis rule table shared by training and decoding.

Parameters and activations are annotated with logical axis names; the rule table
maps them to the mesh axes `data` and `model`. Model code never names mesh axes.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical axis, mesh axis). Unlisted logical axes are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('mlp', 'model'),
    ('embed', None),
    ('head_dim', None),
    ('length', None),
    ('cache_length', None),
    ('layers', None),      # the stacked blocks' leading axis (models/transformer.py)
)


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 2-D (data, model) mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if model_parallelism < 1 or len(devices) % model_parallelism:
    raise ValueError(
        f'model_parallelism={model_parallelism} must be >= 1 and divide the number of '
        f'devices ({len(devices)}).')
  grid = np.asarray(devices).reshape(len(devices) // model_parallelism, model_parallelism)
  return Mesh(grid, ('data', 'model'))


def _mesh_spec(logical_spec, shape, mesh: Mesh, rules) -> PartitionSpec:
  """Logical spec -> mesh spec, replicating dimensions the mesh axis does not divide."""
  if logical_spec is None:
    return PartitionSpec()
  mesh_axes = nn.logical_to_mesh_axes(logical_spec, rules)
  safe = []
  for dim, axis in zip(shape, mesh_axes):
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
  """Sharding for a [B, ...] array: batch over `data`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec('data', *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


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
    axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(axis if axes and dim % size == 0 else None)
  return PartitionSpec(*out)
