"""Any-subset autoregressive models (AS-ARM; Guo and Ermon 2025): the NLL of random
subsets of each document given the rest, predicted in an order, over packed documents."""
import jax
import jax.numpy as jnp

from models import AnySubsetLM, TransformerConfig, families
from training.objectives.base import Objective
from training.objectives.block_diffusion import scored_tokens

ORDERS = ('sorted', 'random', 'l2r')


def draw_ranks(rng: jax.Array, scored: jax.Array, order: str, min_rate: float = 0.0,
               max_rate: float = 1.0) -> jax.Array:
  """[B, T] ranks for models/masks.any_order_training_mask: 0 = known, 1, 2, ... the
  decoding order of the tokens to predict.

  scored: [B, T] bool, the tokens that may be predicted (the rest are always known: a
  document's first token, padding). order:
    sorted  each row draws a masking rate u ~ U[min_rate, max_rate] and predicts each
            scored token with probability u, in increasing position: the reference
            code's "joint" objective (a random subset, its tokens left to right; 2^N
            orders instead of N!, after Shih et al. 2022, arXiv 2205.13554), which is
            the order infilling and continuation decode in;
    random  the same subset, predicted in a uniformly random order (XLNet's any
            permutation; the reference code's any_permutation);
    l2r     every scored token, left to right: the autoregressive special case (its NLL
            is the plain AR loss of the model's left-to-right conditionals).
  Raises ValueError for an unknown order or rates outside 0 <= min_rate <= max_rate <= 1.
  """
  if order not in ORDERS:
    raise ValueError(f'Unknown AS-ARM training order {order!r}; expected one of '
                     f'{", ".join(ORDERS)}.')
  if not 0 <= min_rate <= max_rate <= 1:
    raise ValueError(f'AS-ARM masking rates need 0 <= min_rate <= max_rate <= 1; got '
                     f'[{min_rate}, {max_rate}].')
  rows, length = scored.shape
  rate_key, pick_key, order_key = jax.random.split(rng, 3)
  if order == 'l2r':
    target = scored
  else:
    rate = jax.random.uniform(rate_key, (rows, 1), minval=min_rate, maxval=max_rate)
    target = scored & (jax.random.uniform(pick_key, (rows, length)) < rate)
  key = (jax.random.uniform(order_key, (rows, length)) if order == 'random'
         else jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32), (rows, length)))
  key = jnp.where(target, key, -1.0)  # known tokens first, then the targets by key
  by_rank = jnp.argsort(key, axis=1)
  rank_of = jnp.argsort(by_rank, axis=1)                                 # index in the order
  known = jnp.sum(~target, axis=1, keepdims=True)
  return jnp.where(target, rank_of - known + 1, 0).astype(jnp.int32)


class AnySubsetObjective(Objective):
  """The AS-ARM objective (Guo and Ermon 2025, section 3; the reference code's joint
  two-stream loss): for a random known set K and the rest U of each document predicted
  in order u_1, u_2, ...,
      L = - sum_i log p_theta(x_{u_i} | x_K, x_{u_1} .. x_{u_{i-1}}),
  all terms of a batch in one two-stream forward (AnySubsetLM.training_logits), the loss
  the mean per predicted token. Evaluation uses the left-to-right order over every
  scored token, so the validation loss and bits per byte are the model's exact NLL of
  the text, comparable with an AR model's on the same tokens.
  """

  def __init__(self, model_config: TransformerConfig, order: str = 'sorted',
               min_rate: float = 0.0, max_rate: float = 1.0):
    draw_ranks(jax.random.PRNGKey(0), jnp.ones((1, 2), bool), order, min_rate, max_rate)
    self.model = AnySubsetLM(model_config)
    self.order, self.min_rate, self.max_rate = order, min_rate, max_rate

  def init(self, rng, batch):
    del batch
    return families.init_params(self.model, rng, self.example_batch())

  def sums(self, params, batch: dict, ranks: jax.Array) -> dict:
    """NLL sums of the tokens with rank > 0 (nll_sum, tokens, bytes)."""
    logits = self.model.apply({'params': params}, batch['inputs'], batch['positions'], ranks,
                              batch['segment_ids'], method=AnySubsetLM.training_logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch['inputs'][..., None], axis=-1)[..., 0]
    target = ranks > 0
    _, nbytes = scored_tokens(batch)
    return {'nll_sum': jnp.sum(jnp.where(target, nll, 0.0)),
            'tokens': jnp.sum(target.astype(jnp.float32)),
            'bytes': jnp.sum(jnp.where(target, nbytes, 0)).astype(jnp.float32)}

  def loss(self, params, batch, rng, step, frozen=None):
    del step, frozen
    ranks = draw_ranks(rng, scored_tokens(batch)[0], self.order, self.min_rate, self.max_rate)
    sums = self.sums(params, batch, ranks)
    return sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0), sums

  def eval_sums(self, params, batch, rng, step, frozen=None):
    """Left to right over every scored token: the model's NLL of the text."""
    del step, frozen
    return self.sums(params, batch, draw_ranks(rng, scored_tokens(batch)[0], 'l2r'))


def build(config, vocab_size: int) -> AnySubsetObjective:
  """The AS-ARM objective of `config.asarm` (order, min_rate, max_rate); vocab_size is
  the tokenizer's (the model adds the query token)."""
  trunk = families.build_module(config, vocab_size).config
  return AnySubsetObjective(trunk, config.asarm.order, config.asarm.min_rate,
                            config.asarm.max_rate)
