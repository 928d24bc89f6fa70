"""Block diffusion (BD3-LM; Arriola et al., ICLR 2025): the masked-diffusion NELBO per
block over packed documents, and the data-driven search for the clipped schedule."""
import jax
import jax.numpy as jnp
import numpy as np

from models import BlockDiffusionLM, TransformerConfig, families
from models.block_diffusion import NoiseSchedule
from training.objectives.base import Objective


def scored_tokens(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Which clean tokens x_0 = batch['inputs'] the bound scores, and their UTF-8 bytes.

  Token l is scored when it continues the document of token l - 1 (loss_mask[l - 1]):
  the same tokens the AR loss scores (inputs[l] = targets[l - 1]) but for the row's last
  target, so the two bits-per-byte figures are over (nearly) the same text. Unscored
  tokens (a document's BOS, a row's first token, padding) are never noised: they are
  context, as the AR model's first input is.
  Returns (scored [B, T] bool, bytes [B, T] int32).
  """
  scored = jnp.pad(batch['loss_mask'][:, :-1] > 0, ((0, 0), (1, 0)))
  nbytes = jnp.pad(batch['target_bytes'][:, :-1], ((0, 0), (1, 0)))
  return scored, jnp.where(scored, nbytes, 0)


def block_times(rng: jax.Array, batch: int, num_blocks: int, low: float, high: float):
  """[B, num_blocks] diffusion times in [low, high), one per block, by low-discrepancy
  (stratified) sampling over the batch's blocks as MDLM / BD3-LM do: u_i = (u + i / n)
  mod 1 for the n = B * num_blocks blocks, a lower-variance estimate of the same
  expectation."""
  n = batch * num_blocks
  u = jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(n) / n, 1.0)
  u = jax.random.permutation(jax.random.fold_in(rng, 1), u)
  return (low + (high - low) * u).reshape(batch, num_blocks)


class BlockDiffusionObjective(Objective):
  """The BD3-LM NELBO (Arriola et al. 2025, eq. 8; the MDLM ELBO of Sahoo et al. 2024,
  eq. 10, inside each block):

      L = sum_b E_{t ~ U[0, 1]} [ w(t) sum_{l in block b, x_t^l = MASK}
                                  -log p_theta(x^l | x_t^b, x^{<b}) ],
      w(t) = -alpha'_t / (1 - alpha_t)   (models/block_diffusion.NoiseSchedule),

  one t per block (the reference code draws t per block and repeats it over the block's
  tokens), each scored token masked with probability 1 - alpha_t, all blocks of a
  sequence at once through the vectorized x_t (+) x_0 forward
  (BlockDiffusionLM.training_logits). The loss is the bound per scored token (nats);
  its sums (nll_sum, tokens, bytes) make the trainer's bits per byte an upper bound on
  the model's NLL, comparable with the AR model's on the same tokens (`scored_tokens`).

  Blocks are cut at row indices (multiples of the block size) of the packed rows, so a
  document meets every alignment of its start to the block grid, as in the reference
  code's wrapped sequences; attention stays inside each document (segment ids), and
  sampling aligns blocks to the prompt's position 0, one of the alignments trained.

  Training draws t from the schedule's train range (the clipped interval [beta, omega]
  for 'clipped': BD3-LM section 4, lower-variance gradients); evaluation always uses the
  whole range, so eval figures are the NELBO whatever the schedule.
  """

  def __init__(self, model_config: TransformerConfig, block_size: int, seq_len: int,
               schedule: NoiseSchedule = NoiseSchedule()):
    if block_size < 1:
      raise ValueError(f'bd3lm.block_size must be >= 1, got {block_size}.')
    if seq_len % block_size:
      raise ValueError(f'The block size {block_size} does not divide the training sequence '
                       f'length seq_len={seq_len}.')
    self.model = BlockDiffusionLM(model_config, block_size=block_size)
    self.block_size, self.schedule = block_size, schedule

  def init(self, rng, batch):
    del batch
    return families.init_params(self.model, rng, self.example_batch())

  def noised(self, batch: dict, rng: jax.Array, t_range: tuple[float, float]):
    """x_t of the batch: (noised [B, T], masked [B, T] bool, t per token [B, T])."""
    clean = batch['inputs']
    rows, length = clean.shape
    if length % self.block_size:
      raise ValueError(f'The block size {self.block_size} does not divide the sequence '
                       f'length {length}.')
    t_key, mask_key = jax.random.split(rng)
    t = block_times(t_key, rows, length // self.block_size, *t_range)
    t = jnp.repeat(t, self.block_size, axis=1)                             # [B, T]
    scored, _ = scored_tokens(batch)
    move = 1.0 - self.schedule.alpha(t)                                    # mask probability
    masked = (jax.random.uniform(mask_key, clean.shape) < move) & scored
    return jnp.where(masked, self.model.mask_id, clean), masked, t

  def token_bound(self, params, batch: dict, rng: jax.Array, t_range=None):
    """Per-token NELBO terms [B, T] (w(t) times the masked tokens' NLL, 0 elsewhere) for
    times drawn from t_range (default: the training range)."""
    t_range = self.schedule.train_range() if t_range is None else t_range
    noised, masked, t = self.noised(batch, rng, t_range)
    logits = self.model.apply({'params': params}, noised, batch['inputs'],
                              batch['positions'], batch['segment_ids'],
                              method=BlockDiffusionLM.training_logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch['inputs'][..., None], axis=-1)[..., 0]
    return jnp.where(masked, self.schedule.weight(t) * nll, 0.0)

  def _sums(self, terms, batch):
    scored, nbytes = scored_tokens(batch)
    return {'nll_sum': jnp.sum(terms), 'tokens': jnp.sum(scored.astype(jnp.float32)),
            'bytes': jnp.sum(nbytes).astype(jnp.float32)}

  def loss(self, params, batch, rng, step, frozen=None):
    del step, frozen
    sums = self._sums(self.token_bound(params, batch, rng), batch)
    return sums['nll_sum'] / jnp.maximum(sums['tokens'], 1.0), sums

  def eval_sums(self, params, batch, rng, step, frozen=None):
    """The NELBO sums over the whole time range (whatever the training schedule)."""
    del step, frozen
    return self._sums(self.token_bound(params, batch, rng, self.schedule.eval_range()), batch)


def clip_candidates(widths=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0), grid: float = 0.05):
  """The [beta, omega] intervals the clip search tries: every width in `widths`, its
  start on a `grid` in [0, 1 - width]. The widths are those of the BD3-LM authors' training
  scripts (0.5-0.9 with a 0.05 step, plus the full range U[0, 1]); narrower windows are
  left out on purpose: the estimator's variance keeps falling as the window narrows
  towards high mask rates (a width-0.25 grid here always chose [0.75, 1.0]), while the
  model then never trains on lightly masked blocks, which the full-range bound (and
  sampling's last steps) still score."""
  out = []
  for width in widths:
    for k in range(int(round((1.0 - width) / grid)) + 1):
      beta = round(k * grid, 6)
      out.append((beta, round(min(beta + width, 1.0), 6)))
  return out


def clip_search(objective: BlockDiffusionObjective, params, batches, rng: jax.Array,
                candidates=None, samples: int = 2) -> dict:
  """BD3-LM's data-driven clipped schedule (section 4.2): the interval [beta, omega] of
  mask rates whose training-loss estimator has the smallest variance.

  For each candidate interval the per-sequence loss (the clipped estimator: t ~
  U[beta, omega], weight 1 / t, mean per scored token) is computed on every batch of
  `batches` (host dicts [B, T], e.g. validation batches) `samples` times with fresh
  noise; its variance over all these sequence-level estimates is the criterion (the
  gradient variance it stands for is what the paper minimises; the loss variance is the
  reference code's proxy too). Returns {'beta', 'omega', 'variance', 'table': [(beta,
  omega, mean, variance)]}.
  """
  candidates = candidates or clip_candidates()
  linear = NoiseSchedule('clipped', eps=0.0)
  search_objective = BlockDiffusionObjective.__new__(BlockDiffusionObjective)
  search_objective.__dict__.update(objective.__dict__, schedule=linear)

  @jax.jit
  def per_row(params, batch, rng, low, high):
    terms = search_objective.token_bound(params, batch, rng, (low, high))
    scored, _ = scored_tokens(batch)
    return jnp.sum(terms, 1) / jnp.maximum(jnp.sum(scored, 1), 1)

  table = []
  batches = list(batches)
  for beta, omega in candidates:
    values = []
    for i, batch in enumerate(batches):
      for s in range(samples):
        key = jax.random.fold_in(rng, i * samples + s)
        values.append(np.asarray(per_row(params, batch, key, max(beta, linear.t_min), omega)))
    values = np.concatenate(values)
    table.append((beta, omega, float(values.mean()), float(values.var())))
  best = min(table, key=lambda row: row[3])
  return {'beta': best[0], 'omega': best[1], 'variance': best[3], 'table': table}


def schedule_from_config(config) -> NoiseSchedule:
  """The NoiseSchedule of a config's bd3lm block (schedule, eps, clip 'BETA,OMEGA')."""
  beta, omega = (float(v) for v in str(config.bd3lm.clip).split(','))
  return NoiseSchedule(config.bd3lm.schedule, eps=config.bd3lm.eps, beta=beta, omega=omega)


def build(config, vocab_size: int) -> BlockDiffusionObjective:
  """The BD3-LM objective of `config.bd3lm` (block_size, schedule); vocab_size is the
  tokenizer's (the model adds the mask token)."""
  trunk = families.build_module(config, vocab_size).config
  return BlockDiffusionObjective(trunk, config.bd3lm.block_size, config.seq_len,
                                 schedule_from_config(config))
