"""The compiled decoding loop never copies a KV cache: in every method's HLO the only
copies of a cache-shaped buffer are the ones that initialize it, so a round's cost follows
the context it attends to, not the cache capacity (issue #17). A lax.cond whose branches
write the cache, for one, fails it (see driver._verify_call)."""
import re

import jax
import jax.numpy as jnp
import pytest

from decoding import autoregressive, driver, lookahead, lookup
from decoding.sampling import SamplingConfig
from decoding.speculative import SpeculativeConfig
from models import KVCache
from tests.test_speculative import DRAFT, EOS, TARGET

CAPACITY = 1024   # a size no other array of the tiny models has


def _loop_cache_copies(config, draft=(None, None)):
  """HLO copy instructions of a [L, B, K, S, H] cache buffer (target's or draft's) other
  than copies of the initial broadcast, for one compiled `driver.generate`."""
  shapes = {'f32[%s]' % ','.join(map(str, jax.eval_shape(
      lambda: KVCache.empty(m.config, 1, CAPACITY)).k.shape)) for m, _ in (TARGET, DRAFT)}
  padded, lengths = driver.pad_prompts([[1, 2, 3, 4, 1, 2, 3]])
  text = driver.generate.lower(TARGET[0], TARGET[1], jnp.asarray(padded), jnp.asarray(lengths),
                               config, jax.random.PRNGKey(0), *draft).compile().as_text()
  copy = re.compile(r'= (f32\[[\d,]+\])\{[\d,]*\} copy\(%(\S+)\)')
  found = [m.groups() for m in map(copy.search, text.splitlines()) if m]
  return [(shape, src) for shape, src in found if shape in shapes and 'broadcast' not in src]


# Jacobi rounds take lookup's path (a deterministic chain with num_drafted), lookahead the
# tree-mask path, speculative the drafter's second cache.
# 'chunked prefill': the 7-token prompt through the trunk in 3 calls (a lax.scan whose carry
# is the cache).
@pytest.mark.parametrize('method', ['autoregressive', 'lookup', 'lookahead', 'speculative',
                                    'chunked prefill'])
def test_no_method_copies_the_cache_in_its_loop(method):
  settings = (16, CAPACITY, SamplingConfig(), (EOS,))
  config, draft = {
      'autoregressive': (autoregressive.AutoregressiveConfig(*settings), (None, None)),
      'chunked prefill': (autoregressive.AutoregressiveConfig(*settings, prefill_chunk=3),
                          (None, None)),
      'lookup': (lookup.LookupConfig(*settings, num_draft=4), (None, None)),
      'lookahead': (lookahead.LookaheadConfig(*settings), (None, None)),
      'speculative': (SpeculativeConfig(*settings, num_draft=3), DRAFT)}[method]
  assert _loop_cache_copies(config, draft) == []
