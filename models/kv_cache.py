"""The key/value cache: a pytree argument and result of every cached forward call.

Axis letters: L cache layers, B batch, S capacity (slots), K kv heads, H head dim,
T tokens in one call.

Two things are kept apart:
  lengths      [B] how many leading slots of each row hold valid entries (what
               `keep` sets once a method knows which tokens it keeps);
  write slots  [B, T] where one call writes its tokens' keys/values: by default
               the T slots after `lengths` (an append), or any slots the caller
               names (tree nodes past the root, a diffusion block scored without
               being kept, non-contiguous positions of an any-order model).
A call that appends advances `lengths` by T; a call with explicit write slots leaves
`lengths` alone: writing is not keeping. Keeping K speculative tokens of a block is
then a length update (plus `move_slots` for a tree path), never a reallocation.
"""
import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Fixed-capacity key/value cache, passed in and returned (never mutated in place)."""
  k: jax.Array         # [L, B, K, S, H]
  v: jax.Array         # [L, B, K, S, H]
  lengths: jax.Array   # [B] int32, valid slots per row

  @classmethod
  def empty(cls, config, batch_size: int, capacity: int) -> 'KVCache':
    """Zeros for `config.cache_layers` layers (config: models.TransformerConfig or any
    object with cache_layers, num_kv_heads, head_dim, activation_dtype)."""
    shape = (config.cache_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
    dtype = config.activation_dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  def append_slots(self, num_tokens: int) -> jax.Array:
    """[B, T] the slots an append of T tokens writes: lengths[b] + t."""
    return self.lengths[:, None] + jnp.arange(num_tokens)[None, :]

  def keep(self, lengths: jax.Array) -> 'KVCache':
    """The same entries with `lengths` [B] valid slots per row."""
    return self.replace(lengths=lengths.astype(jnp.int32))

  def move_slots(self, source: jax.Array, target: jax.Array) -> 'KVCache':
    """Copies slots source[b, m] to target[b, m] in every layer (an accepted tree path
    moved into place). source, target: [B, M] int; a target >= capacity is skipped.
    All reads happen before any write."""
    rows = jnp.arange(self.k.shape[1])[:, None]
    moved_k = self.k[:, rows, :, source]                                   # [B, M, L, K, H]
    moved_v = self.v[:, rows, :, source]
    return self.replace(k=self.k.at[:, rows, :, target].set(moved_k, mode='drop'),
                        v=self.v.at[:, rows, :, target].set(moved_v, mode='drop'))
