"""Decoding methods: each a jitted lax.while_loop program (decoding/driver.py).

    from decoding import driver, registry
    out = driver.generate(model, params, prompts, prompt_lengths, config, rng
                          [, drafter, drafter_params])

A method is a config (driver.DecodeConfig subclass) plus, for the speculative ones, a
proposer (decoding/proposal.py); registry.METHODS names them. Imports models/ only
(never training/).
"""
from decoding import autoregressive, driver, proposal, registry, sampling, trees, verify
from decoding.driver import DecodeConfig, Output, generate
from decoding.sampling import SamplingConfig
