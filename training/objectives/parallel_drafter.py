"""The parallel block drafter (DFlash) on a frozen target: the block denoising loss on
corpus text against the target's own distributions.

One training step (DFlash, Chen et al. 2026, section 3.3; the anchors and the decay
weights as in the paper):
  1. the frozen target reads the packed batch once: its per-layer hidden states give every
     position's context feature, its logits the soft labels;
  2. `num_anchors` anchor positions a are drawn per row (without replacement, among
     positions with a real next token); each anchors one block: entry 0 = x_a, entries
     1 .. b - 1 = the mask token, at positions a .. a + b - 1;
  3. the drafter runs every block in one call over [context features; blocks] under a
     mask where block m sees its own block (bidirectionally) and the context features
     of positions < a_m in its document, exactly what it sees at decoding (the features
     of the committed tokens before the root);
  4. the loss at block position k >= 1 is the cross-entropy from the target's
     distribution p(. | x_{<a+k}) to the drafter's q_k, weighted by exp(-(k - 1) / gamma)
     (early positions decide whether later ones are ever reached), averaged over the
     weights of the valid positions.

Why this loss (the issue leaves the choice open):
  * It is the masked-diffusion objective at the one noise level decoding uses: decoding
    denoises an all-mask block in a single call, so training on partly unmasked blocks
    (other noise levels) would spend capacity on states the drafter never sees.
  * Corpus text with target-distilled soft labels, not target-generated continuations:
    one teacher-forced target call gives the features and the labels of every position
    (generating continuations costs a sequential decode of the target per batch, more
    than the drafter's own training on 2 CPU cores), and the label is the target's whole
    distribution, the quantity acceptance measures (greedy: its argmax; sampling: the
    accepted mass sum_x min(p, q) = 1 - TV(p, q), which the KL bounds), where a data
    token would teach the corpus, not the target. The price: positions k > 1 condition on
    the corpus's intermediate tokens, not on the target's own continuation; a target
    trained on this corpus keeps the two close.
Metrics per block (summarize: per valid first position): head1_agree (the drafter's
first token equals the target's argmax), head_accept (drafted positions accepted by a
greedy chain against the target's argmaxes on the corpus text: the offline tau - 1),
head1_nll (NLL of the corpus token at k = 1).
"""
import jax
import jax.numpy as jnp

from models import ParallelDrafter, TransformerConfig, families, masks
from training.objectives.base import Objective, next_token_nll, restore_target


def training_mask(segment_ids: jax.Array, anchors: jax.Array, keep: jax.Array,
                  block_size: int) -> jax.Array:
  """[B, T + M b, T + M b] the drafter's training mask over [context (T); M blocks of b].

  segment_ids: [B, T] document ids (0 = padding); anchors: [B, M] positions; keep: [B, M]
  real blocks. Context entry t sees itself only (its output is dropped); block m sees
  the context entries t < anchors[m] of its anchor's document and its own block.
  """
  batch, length = segment_ids.shape
  num_blocks = anchors.shape[1]
  rows = jnp.arange(batch)[:, None]
  block_of = jnp.repeat(jnp.arange(num_blocks), block_size)                  # [M b]
  anchor = anchors[:, block_of]                                               # [B, M b]
  doc = segment_ids[rows, anchors][:, block_of]
  context = ((jnp.arange(length)[None, None] < anchor[..., None])
             & (segment_ids[:, None, :] == doc[..., None])
             & keep[:, block_of][..., None])                                  # [B, M b, T]
  own = (block_of[:, None] == block_of[None, :])[None] & keep[:, block_of][..., None]
  top = jnp.concatenate([jnp.broadcast_to(jnp.eye(length, dtype=bool), (batch, length, length)),
                         jnp.zeros((batch, length, num_blocks * block_size), bool)], axis=2)
  return jnp.concatenate([top, jnp.concatenate([context, own], axis=2)], axis=1)


class ParallelDrafterObjective(Objective):
  """ParallelDrafter on a frozen target (module docstring)."""

  def __init__(self, drafter: ParallelDrafter, target, target_params, num_anchors: int = 16,
               loss_decay: float = 4.0):
    if target.config != drafter.config:
      raise ValueError('The parallel drafter reads the target\'s features: config.model must '
                       'be the target\'s model (launch.train copies it from target_workdir).')
    if drafter.block_size < 2:
      raise ValueError(f'parallel_drafter.block_size={drafter.block_size}: a block holds the '
                       'root and at least one drafted position (>= 2).')
    if num_anchors < 1 or loss_decay <= 0:
      raise ValueError(f'parallel_drafter.num_anchors ({num_anchors}) must be >= 1 and '
                       f'loss_decay ({loss_decay}) > 0.')
    self.model, self.base = drafter, target
    self.num_anchors, self.loss_decay = num_anchors, loss_decay
    self.frozen_model, self.frozen_params = target, target_params

  def init(self, rng, batch):
    return families.init_params(self.model, rng, batch)

  def loss(self, params, batch, rng, step, frozen=None):
    del step
    inputs, segments, loss_mask = batch['inputs'], batch['segment_ids'], batch['loss_mask']
    batch_size, length = inputs.shape
    b, vocab = self.model.block_size, self.base.config.vocab_size
    out = self.base.apply({'params': frozen}, inputs, batch['positions'],
                          masks.packed_causal_mask(segments), return_layer_hidden=True)
    features = jax.lax.stop_gradient(jnp.concatenate(
        [out.layer_hidden[i] for i in self.model.target_layers], axis=-1).astype(jnp.float32))
    target_logp = jax.lax.stop_gradient(jax.nn.log_softmax(out.logits[..., :vocab], -1))

    # Anchors: positions whose next token is real, drawn without replacement.
    anchorable = loss_mask > 0
    num = min(self.num_anchors, length)
    scores = jnp.where(anchorable, jax.random.uniform(rng, (batch_size, length)), -1.0)
    top, anchors = jax.lax.top_k(scores, num)                                # [B, M]
    keep = top >= 0
    rows = jnp.arange(batch_size)[:, None]
    offsets = jnp.arange(b)
    block_positions = anchors[..., None] + offsets                            # [B, M, b]
    flat_positions = block_positions.reshape(batch_size, -1)
    # Label of block position k: x_{a+k}, predicted by the target at a + k - 1.
    source = jnp.clip(block_positions - 1, 0, length - 1)
    valid = (keep[..., None] & (offsets >= 1) & (block_positions - 1 < length)
             & (loss_mask[rows[..., None], source] > 0)
             & (segments[rows[..., None], source] == segments[rows, anchors][..., None]))
    soft = target_logp[rows[..., None], source]                               # [B, M, b, V]
    hard = batch['targets'][rows[..., None], source]

    embed = lambda t: self.base.apply({'params': frozen}, t, method=self.base.embed)
    roots = jnp.broadcast_to(inputs[rows, anchors][..., None], block_positions.shape)
    block = jax.lax.stop_gradient(embed(roots.reshape(batch_size, -1)))       # [B, M b, D]
    is_mask = jnp.broadcast_to(offsets >= 1, block_positions.shape).reshape(batch_size, -1)
    positions = jnp.concatenate([batch['positions'], flat_positions], axis=1)
    mask = training_mask(segments, anchors, keep, b)
    hidden, _ = self.model.apply({'params': params}, features, block, is_mask, positions, mask)
    logits = self.base.apply({'params': frozen}, hidden, method=self.base.logits)
    draft_logp = jax.nn.log_softmax(logits[..., :vocab], -1).reshape(soft.shape)

    weights = jnp.where(valid, jnp.exp(-jnp.maximum(offsets - 1, 0) / self.loss_decay), 0.0)
    cross_entropy = -jnp.sum(jnp.exp(soft) * draft_logp, axis=-1)              # [B, M, b]
    loss = jnp.sum(cross_entropy * weights) / jnp.maximum(jnp.sum(weights), 1e-6)

    agree = (jnp.argmax(draft_logp, -1) == jnp.argmax(soft, -1)) & valid
    accepted = jnp.sum(jnp.cumprod(agree[..., 1:], axis=-1), axis=-1)           # [B, M]
    first = valid[..., 1].astype(jnp.float32)
    nll1 = -jnp.take_along_axis(draft_logp[..., 1, :], hard[..., 1:2], -1)[..., 0]
    sums = dict(next_token_nll(out.logits, batch), head_tokens=jnp.sum(first),
                head1_agree_sum=jnp.sum(agree[..., 1] * first),
                head_accept_sum=jnp.sum(accepted * first),
                head1_nll_sum=jnp.sum(nll1 * first))
    return loss, sums


def build(config, vocab_size: int) -> ParallelDrafterObjective:
  """The drafter of `config.parallel_drafter` on the target restored from
  `config.target_workdir`."""
  trunk = families.transformer_config(config, vocab_size)
  target = restore_target(config, 'The parallel drafter needs')
  settings = config.parallel_drafter
  return ParallelDrafterObjective(families.parallel_drafter(settings, trunk), target.model,
                                  target.params, num_anchors=settings.num_anchors,
                                  loss_decay=settings.loss_decay)
