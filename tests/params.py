"""Parameters of the tests' small random models, initialized by one compiled program.

Eager `module.init` compiles every op of the initializers on its own: about 100 small
programs and 5 s for a 2-layer Transformer, paid again in every test file (conftest
clears the compile caches after each file). Under jit it is one program of about 1.5 s.
"""
import flax.linen as nn
import jax


def init(module: nn.Module, seed: int, *inputs) -> dict:
  """module.init(PRNGKey(seed), *inputs) under jax.jit, partitioning metadata removed:
  the module's variables ({'params': ...}). The values are those of eager init (the same
  random bits and initializers)."""
  return nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), *inputs))
