"""Plain autoregressive decoding: the baseline every faster method is measured against.

One prefill call over the padded prompts, then one `lax.while_loop` that feeds each
row's last token and samples the next, one target call per iteration, until every
row is done (decoding/driver.py: a method without a proposer).

    out = driver.generate(model, params, prompts, prompt_lengths,
                          AutoregressiveConfig(max_new_tokens=32, cache_capacity=96), rng)
"""
import dataclasses

from decoding import driver


@dataclasses.dataclass(frozen=True)
class AutoregressiveConfig(driver.DecodeConfig):
  """Static settings (hashable: a static argument of jit): max_new_tokens,
  cache_capacity (S: prompt + new tokens per row must fit), sampling, eos_ids."""
