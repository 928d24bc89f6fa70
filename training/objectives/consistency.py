"""Consistency training (CLLM; Kou et al. 2024): an LM fine-tuned to jump to the Jacobi
fixed point, trained on Jacobi trajectories collected from it (launch.collect_jacobi)."""
import jax
import jax.numpy as jnp

from models import TransformerConfig, families, masks
from training.objectives.ar_lm import LanguageModelObjective


def block_sequences(context: jax.Array, context_lengths: jax.Array, block: jax.Array):
  """Each row's context followed by its n-token block, right-padded to one length.

  context: [B, C] int, right-padded; context_lengths: [B] int in [1, C]; block: [B, n].
  Returns (tokens [B, C + n], positions [B, C + n], segment_ids [B, C + n]: 1 on the
  row's L + n real tokens, 0 on padding) and the index [B, n] of the logits that
  predict each block token: L - 1 + i predicts block token i.
  """
  batch, width = context.shape
  n = block.shape[1]
  t = jnp.arange(width + n)[None]                                        # [1, T]
  lengths = context_lengths[:, None]
  offset = t - lengths                                                   # block index
  in_block = (offset >= 0) & (offset < n)
  from_block = jnp.take_along_axis(block, jnp.clip(offset, 0, n - 1), axis=1)
  from_context = jnp.pad(context, ((0, 0), (0, n)))
  tokens = jnp.where(in_block, from_block, jnp.where(t < lengths, from_context, 0))
  segment_ids = (t < lengths + n).astype(jnp.int32)
  positions = jnp.broadcast_to(t, (batch, width + n)).astype(jnp.int32)
  predicting = lengths - 1 + jnp.arange(n)[None]                          # [B, n]
  return tokens.astype(jnp.int32), positions, segment_ids, predicting


def pick_states(states: jax.Array, fixed_point: jax.Array, rng: jax.Array):
  """One intermediate Jacobi state per row, uniformly among those that differ from the
  fixed point (the reference code draws one point of the trajectory per sample).

  states: [B, J, n]; fixed_point: [B, n]. Returns (state [B, n], has_state [B] bool:
  False where every state equals the fixed point; that row's state is then the fixed
  point and carries no consistency loss).
  """
  differs = jnp.any(states != fixed_point[:, None], axis=-1)              # [B, J]
  score = jnp.where(differs, jax.random.uniform(rng, differs.shape), -1.0)
  index = jnp.argmax(score, axis=-1)
  state = jnp.take_along_axis(states, index[:, None, None], axis=1)[:, 0]
  has_state = jnp.any(differs, axis=-1)
  return jnp.where(has_state[:, None], state, fixed_point), has_state


class ConsistencyObjective(LanguageModelObjective):
  """CLLM fine-tuning (Kou et al. 2024, "CLLMs: Consistency Large Language Models",
  section 3.2): L = L_GC + w * L_AR on Jacobi trajectories of the model itself.

  A training record holds a context x (prompt + earlier blocks' fixed points), the Jacobi
  states y^0 .. y^J of one n-token block and its fixed point y* (= greedy AR decoding).

  Global consistency loss (eq. 4): for a state y drawn from the trajectory,
      sum_i D( q_sg(. | x, y*_<i) || q_theta(. | x, y_<i) ),  i = 1 .. n,
  the student's distribution at every block position given the intermediate state must
  match the (stop-gradient) distribution given the fixed point, computed with the same
  parameters (theta^- = theta, stop-gradient, as in the paper). D is the forward KL
  (teacher || student): the paper's main results use it (it lists reverse KL and their
  JSD mixture as alternatives), and the authors' training code minimises the soft-label
  cross-entropy, which is the forward KL plus the teacher's entropy (no gradient). We
  report the KL itself, so a student that already maps every state to the fixed point's
  distributions has loss exactly 0. As in the reference code, one state per record is
  drawn (uniformly among those differing from y*) per step, and the positions before
  the first token where y differs from y* are left out of the average (their inputs
  equal the fixed point's, so their KL is 0 and they carry no signal); so are the
  positions after the fixed point's first EOS (`block_mask`).

  AR loss (eq. 6): -sum_i log q_theta(y*_i | x, y*_<i) over the block, i.e. next-token
  NLL on the target's own greedy generation given the prompt, which keeps the model
  close to the target's distribution. Weight w = 10 and label smoothing 0.1 follow the
  authors' training code (the paper leaves w a hyperparameter); both losses are means
  per block token. One forward pass on (x, y*) gives both the AR loss (with gradient)
  and the consistency targets (under stop_gradient); a second on (x, y) the student.

  Evaluation (the trainer's eval on the corpus validation split) is the plain LM
  next-token loss: the fine-tuned model stays a normal LM and that is the number to
  watch. Training batches come from config.cllm.trajectories (`train_dataset`).
  Metrics (sums): nll_sum / tokens (AR NLL of y*, no smoothing), consistency_sum /
  consistency_positions (the KL), block_agree_sum (student's greedy token given y equals
  y*, over the consistency positions).
  """

  def __init__(self, model_config: TransformerConfig, trajectories: str = '',
               ar_weight: float = 10.0, label_smoothing: float = 0.1):
    super().__init__(model_config)
    if ar_weight < 0 or not 0 <= label_smoothing < 1:
      raise ValueError(f'cllm.ar_weight must be >= 0 and cllm.label_smoothing in [0, 1); got '
                       f'{ar_weight} and {label_smoothing}.')
    self.trajectories = trajectories
    self.ar_weight, self.label_smoothing = ar_weight, label_smoothing

  def init(self, rng, batch):
    del batch  # Parameter shapes do not depend on the batch (a trajectory batch here).
    return families.init_params(self.model, rng, self.example_batch())

  def train_dataset(self, batch_size: int, seed: int, process_index: int, process_count: int):
    if not self.trajectories:
      raise ValueError('Consistency training needs config.cllm.trajectories (a dataset of '
                       'python -m launch.collect_jacobi).')
    from training import data  # grain + TFDS: only where a model trains, not where it decodes
    return data.trajectory_dataset(self.trajectories, batch_size=batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count)

  def _block_logits(self, params, batch, block):
    """[B, n, V] logits predicting each block token given the context and `block`."""
    tokens, positions, segment_ids, predicting = block_sequences(
        batch['context'], batch['context_lengths'], block)
    logits = self.model.apply({'params': params}, tokens, positions,
                              masks.packed_causal_mask(segment_ids)).logits
    return jnp.take_along_axis(logits, predicting[..., None], axis=1)

  def loss(self, params, batch, rng, step, frozen=None):
    del step, frozen
    vocab = self.model.config.vocab_size
    fixed_point = batch['fixed_point']
    block_mask = batch['block_mask'] > 0                                   # [B, n]
    state, has_state = pick_states(batch['states'], fixed_point, rng)

    # (x, y*): the AR loss, and the consistency targets under stop_gradient.
    fixed_logits = self._block_logits(params, batch, fixed_point)          # [B, n, V]
    logp = jax.nn.log_softmax(fixed_logits, axis=-1)   # padded vocab, as the LM's loss
    nll = -jnp.take_along_axis(logp, fixed_point[..., None], axis=-1)[..., 0]
    smooth = -jnp.mean(logp[..., :vocab], axis=-1)
    ar_token = (1 - self.label_smoothing) * nll + self.label_smoothing * smooth
    ar_mask = block_mask.astype(jnp.float32)
    tokens = jnp.sum(ar_mask)
    ar_loss = jnp.sum(ar_token * ar_mask) / jnp.maximum(tokens, 1.0)

    # (x, y): the student; forward KL to the fixed point's distributions.
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(fixed_logits[..., :vocab], axis=-1))
    student = jax.nn.log_softmax(self._block_logits(params, batch, state)[..., :vocab], -1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)          # [B, n]
    # Position i reads y_<i: it can differ from the fixed point's from the first mismatch on.
    first = jnp.argmax(state != fixed_point, axis=-1)                      # [B]
    n = fixed_point.shape[1]
    cmask = (block_mask & (jnp.arange(n)[None] >= first[:, None])
             & has_state[:, None]).astype(jnp.float32)
    positions = jnp.sum(cmask)
    consistency = jnp.sum(kl * cmask) / jnp.maximum(positions, 1.0)
    agree = jnp.argmax(student, -1) == fixed_point

    sums = {'nll_sum': jnp.sum(nll * ar_mask), 'tokens': tokens,
            'bytes': jnp.zeros((), jnp.float32),
            'consistency_sum': jnp.sum(kl * cmask), 'consistency_positions': positions,
            'block_agree_sum': jnp.sum(agree * cmask)}
    return consistency + self.ar_weight * ar_loss, sums

  def eval_sums(self, params, batch, rng, step, frozen=None):
    """The LM's next-token sums on a text batch (the trainer's eval on the corpus)."""
    return LanguageModelObjective.loss(self, params, batch, rng, step, frozen)[1]


def build(config, vocab_size: int) -> ConsistencyObjective:
  """The LM of `config.model` (copied from config.init_from, the target it fine-tunes)
  trained on the trajectories of `config.cllm`."""
  if not config.get('init_from', ''):
    raise ValueError('Consistency training fine-tunes a trained target: set '
                     'config.init_from to its workdir.')
  return ConsistencyObjective(families.transformer_config(config, vocab_size),
                              trajectories=config.cllm.trajectories,
                              ar_weight=config.cllm.ar_weight,
                              label_smoothing=config.cllm.label_smoothing)
