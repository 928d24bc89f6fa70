"""The early-exit LM: exit heads at chosen layers, trained with CALM's weighted per-layer
losses or the LayerSkip recipe; the model stays a plain LM at its last layer."""
import math

import jax
import jax.numpy as jnp

from models import TransformerConfig, families, masks
from training.objectives.ar_lm import LanguageModelObjective

RECIPES = ('calm', 'layerskip')
CURRICULA = ('none', 'rotational', 'gradual')


class EarlyExitObjective(LanguageModelObjective):
  """Cross-entropy at every exit E of model.exit_layers (block E - 1's output through the
  exit's norm and the shared unembedding) and at the last layer, combined by `recipe`:

  calm       CALM (Schuster et al. 2022, section 5, "Training"): sum_i w_i L_i with
             w_i = i / sum_j j over the exits' layer numbers i (the last layer L included),
             favouring the top layers.
  layerskip  LayerSkip (Elhoushi et al. 2024, section 4.1):
             layer dropout: block l (0-based) of each sequence is dropped (its output is its
               input) with probability p_l = p_max (exp(l ln 2 / (L - 1)) - 1), 0 for the
               first block and p_max for the last; the paper's time scale S(t) is 1 here
               (its choice outside continual pretraining);
             early-exit loss: sum_l e~(t, l) CE_l with e(l) = e_scale sum_{i<=l} i for an
               exit after block l and L - 1 + e_scale sum_{i<=L-2} i for the last layer,
               e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i), where the curriculum C enables
               the early exits 'rotational'ly (exit j on at steps t with j = t mod R) or
               'gradual'ly (from the top exit down, one more every T / (2 n) steps for n
               exits; all on after half the run), or always ('none'); the last layer is
               always on. The paper puts exits at every layer; here at model.exit_layers.

  CALM's early-exit classifier (section 3.5) trains in the same step on stop-gradient exit
  states (so it changes nothing else: CALM trains it after the model, on the frozen
  model), with binary cross-entropy against the consistency label "this exit's top-1
  token equals the last layer's".

  Metrics: nll_sum is the LAST layer's (the reported loss is the plain LM's), and per
  exit E exit{E}_nll and exit{E}_agree (top-1 agreement with the last layer) per token,
  and exit_classifier_bce. Evaluation runs without layer dropout.
  """

  def __init__(self, model_config: TransformerConfig, recipe: str = 'layerskip',
               layer_dropout: float = 0.1, curriculum: str = 'rotational', rotation: int = 2,
               e_scale: float = 1.0, num_steps: int = 1, classifier_weight: float = 1.0):
    if not model_config.exit_layers:
      raise ValueError('The early_exit family needs model.exit_layers (at least one exit '
                       f'in [1, {model_config.num_layers})).')
    if recipe not in RECIPES:
      raise ValueError(f'Unknown early-exit recipe {recipe!r}; expected one of '
                       f'{", ".join(RECIPES)}.')
    if curriculum not in CURRICULA:
      raise ValueError(f'Unknown early-exit curriculum {curriculum!r}; expected one of '
                       f'{", ".join(CURRICULA)}.')
    if not 0 <= layer_dropout < 1:
      raise ValueError(f'layer_dropout={layer_dropout}; expected p_max in [0, 1).')
    if rotation < 1:
      raise ValueError(f'rotation={rotation}; expected R >= 1.')
    super().__init__(model_config)
    self.recipe, self.curriculum, self.rotation = recipe, curriculum, rotation
    self.layer_dropout, self.e_scale = layer_dropout, e_scale
    self.num_steps, self.classifier_weight = max(num_steps, 1), classifier_weight
    num_layers = model_config.num_layers
    self.exits = tuple(model_config.exit_layers) + (num_layers,)

  # -- weights ---------------------------------------------------------------------------

  def dropout_rates(self) -> jax.Array:
    """[L] LayerSkip's per-block drop probability p_max (exp(l ln 2 / (L - 1)) - 1)."""
    num_layers = self.model.config.num_layers
    l = jnp.arange(num_layers, dtype=jnp.float32)
    scale = jnp.exp(l * math.log(2) / max(num_layers - 1, 1)) - 1
    return self.layer_dropout * scale

  def exit_weights(self, step) -> jax.Array:
    """[n + 1] the loss weights of the exits and the last layer at training step `step`
    (they sum to 1)."""
    exits = jnp.asarray(self.exits, jnp.float32)
    if self.recipe == 'calm':
      return exits / jnp.sum(exits)
    num_layers, n = self.model.config.num_layers, len(self.exits) - 1
    l = exits - 1                                    # the block each exit reads, 0-based
    e = self.e_scale * l * (l + 1) / 2
    last = (num_layers - 1) + self.e_scale * (num_layers - 2) * (num_layers - 1) / 2
    e = e.at[-1].set(last)
    j = jnp.arange(n + 1)
    if self.curriculum == 'rotational':
      on = (j % self.rotation) == (step % self.rotation)
    elif self.curriculum == 'gradual':
      on = step >= (n - j) * self.num_steps / (2 * n)
    else:
      on = jnp.ones((n + 1,), bool)
    weights = jnp.where(on | (j == n), e, 0.0)
    return weights / jnp.sum(weights)

  # -- loss ------------------------------------------------------------------------------

  def _exit_logits(self, params, batch, keep):
    """-> ([n + 1, B, T, V] logits of the exits and the last layer, [n, B, T, D] the exits'
    normalised hidden states)."""
    model = self.model
    out = model.apply({'params': params}, batch['inputs'], batch['positions'],
                      masks.packed_causal_mask(batch['segment_ids']),
                      return_layer_hidden=True, layer_keep=keep)
    hidden = [model.apply({'params': params}, out.layer_hidden[e - 1], i,
                          method=type(model).exit_hidden) for i, e in enumerate(self.exits[:-1])]
    logits = [model.apply({'params': params}, h, method=type(model).logits) for h in hidden]
    return jnp.stack(logits + [out.logits]), jnp.stack(hidden)

  def loss(self, params, batch, rng, step, frozen=None, train=True):
    del frozen
    keep = None
    if train and self.recipe == 'layerskip' and self.layer_dropout > 0:
      batch_size = batch['inputs'].shape[0]
      u = jax.random.uniform(rng, (self.model.config.num_layers, batch_size))
      keep = u >= self.dropout_rates()[:, None]
    logits, hidden = self._exit_logits(params, batch, keep)
    logp = jax.nn.log_softmax(logits, axis=-1)   # over the padded vocabulary, as the LM's
    nll = -jnp.take_along_axis(logp, batch['targets'][None, ..., None], axis=-1)[..., 0]
    mask = batch['loss_mask'].astype(jnp.float32)
    tokens = jnp.sum(mask)
    nll_sums = jnp.sum(nll * mask, axis=(1, 2))                         # [n + 1]
    top1 = jnp.argmax(logp, axis=-1)                                    # [n + 1, B, T]
    agree = (top1[:-1] == top1[-1]).astype(jnp.float32)                 # [n, B, T]
    # CALM's classifier on frozen states: label 1 where the exit agrees with the top.
    h = jax.lax.stop_gradient(hidden)
    conf = self.model.apply({'params': params}, h, method=type(self.model).exit_confidence)
    conf = jnp.clip(conf, 1e-6, 1 - 1e-6)
    bce = -(agree * jnp.log(conf) + (1 - agree) * jnp.log(1 - conf))   # [n, B, T]
    bce_sum = jnp.sum(bce * mask)
    weights = self.exit_weights(step)
    loss = (jnp.sum(weights * nll_sums) + self.classifier_weight * bce_sum / len(hidden)
            ) / jnp.maximum(tokens, 1.0)
    sums = {'nll_sum': nll_sums[-1], 'tokens': tokens, 'head_tokens': tokens,
            'bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32),
            'exit_classifier_bce_sum': bce_sum / len(hidden)}
    for i, e in enumerate(self.exits[:-1]):
      sums[f'exit{e}_nll_sum'] = nll_sums[i]
      sums[f'exit{e}_agree_sum'] = jnp.sum(agree[i] * mask)
    return loss, sums

  def eval_sums(self, params, batch, rng, step, frozen=None):
    return self.loss(params, batch, rng, step, frozen, train=False)[1]


def build(config, vocab_size: int) -> EarlyExitObjective:
  e = config.early_exit
  return EarlyExitObjective(families.transformer_config(config, vocab_size), recipe=e.recipe,
                            layer_dropout=e.layer_dropout, curriculum=e.curriculum,
                            rotation=e.rotation, e_scale=e.e_scale,
                            num_steps=config.num_train_steps,
                            classifier_weight=e.classifier_weight)
