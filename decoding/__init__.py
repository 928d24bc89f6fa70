"""Decoding methods: each a jitted lax.while_loop program over a state dataclass.

Imports models/ only (never training/).
"""
from decoding import autoregressive, base, sampling
from decoding.base import Output
from decoding.sampling import SamplingConfig

METHODS = ('autoregressive',)
