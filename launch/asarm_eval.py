"""Evaluate an any-subset AR model (AS-ARM, configs/asarm.py): ASSD against sequential
any-order decoding, and infilling against an AR model of the same size.

  python -m launch.asarm_eval --asarm_workdir=/tmp/asarm_tiny --ar_workdir=/tmp/ar_tiny \
      [--drafts=2,4,8 --batch_sizes=1,8 --temperatures=0,1] [--json]

Rows (the bench rows of this family; each figure through launch.generation.decode_tokens,
the timing of launch.bench: compile excluded, median of --repeats):
  * continuation (left to right after --prompt_len validation tokens, --max_new_tokens
    new ones) and infilling (a --span_len span in the middle of a --infill_len window
    of a validation row, prefix and suffix known) with sequential any-order decoding
    and ASSD for each k in --drafts, batch sizes --batch_sizes, temperatures
    --temperatures: NFE per generated token (model calls each row needed after the
    prefill, over its new tokens), tokens/s, and speedup = ASSD tokens/s over
    sequential tokens/s at the same batch size, temperature and task; the AR model's
    own autoregressive decoding is listed for scale;
  * infilling NLL (nats per span token, the same spans of held-out code): the AS-ARM
    given prefix and suffix, the AS-ARM given the prefix only, and the AR model given
    the prefix only (exact NLLs: the AS-ARM's left-to-right factorization of the span,
    the AR model's next-token one).
"""
import dataclasses
import json

from absl import app, flags

from launch import common

_ASARM = flags.DEFINE_string('asarm_workdir', None, 'The AS-ARM workdir (configs/asarm.py).')
_AR = flags.DEFINE_string('ar_workdir', None, 'An AR model of the same size and tokenizer.')
_DRAFTS = flags.DEFINE_list('drafts', ['2', '4', '8'], 'ASSD draft lengths k.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Rows per decoding call.')
_TEMPS = flags.DEFINE_list('temperatures', ['0', '1'], 'Sampling temperatures (0 = greedy).')
_PROMPTS = flags.DEFINE_integer('num_prompts', 8, 'Validation prompts / windows.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Continuation: prompt tokens.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Continuation: new tokens.')
_WINDOW = flags.DEFINE_integer('infill_len', 96, 'Infilling: tokens per window.')
_SPAN = flags.DEFINE_integer('span_len', 32, 'Infilling: span tokens (in the middle).')
_NLL_ROWS = flags.DEFINE_integer('nll_windows', 64, 'Infilling NLL: validation windows.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per figure (median).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')


def windows(restored, count: int, length: int):
  """[count, length] windows of held-out text: validation rows whose first `length`
  tokens lie in one document (numpy int32)."""
  import numpy as np
  from training import data
  config = restored.config
  sources = data.load_sources(config.data)
  seq_len = max(config.seq_len, length)
  out = []
  for batch in data.eval_batches(sources['validation'], restored.tokenizer,
                                 batch_size=config.batch_size, seq_len=seq_len,
                                 num_batches=64):
    for row in range(batch['inputs'].shape[0]):
      seg = batch['segment_ids'][row, :length]
      if seg[0] != 0 and np.all(seg == seg[0]):
        out.append(batch['inputs'][row, :length])
      if len(out) == count:
        return np.stack(out).astype(np.int32)
  if not out:
    raise ValueError(f'No validation window of {length} tokens in one document.')
  return np.stack(out).astype(np.int32)


def infill_nll(asarm, ar, rows, span: tuple[int, int]) -> dict:
  """Nats per span token over rows [N, W] (span = [start, stop)): the AS-ARM given
  prefix and suffix, given the prefix only, and the AR model given the prefix only."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from models import AnySubsetLM
  start, stop = span

  def asarm_nll(tokens):
    n, length = tokens.shape
    ranks = np.zeros_like(tokens)
    ranks[:, start:stop] = np.arange(1, stop - start + 1)
    logits = asarm.model.apply({'params': asarm.params}, jnp.asarray(tokens),
                               jnp.broadcast_to(jnp.arange(length), (n, length)),
                               jnp.asarray(ranks), jnp.ones((n, length), jnp.int32),
                               method=AnySubsetLM.training_logits)
    logp = jax.nn.log_softmax(logits[:, start:stop], -1)
    return -float(jnp.take_along_axis(logp, jnp.asarray(tokens[:, start:stop, None]), -1).sum())

  prefix = rows[:, :stop]
  out = ar.model.apply({'params': ar.params}, jnp.asarray(prefix),
                       jnp.broadcast_to(jnp.arange(stop), prefix.shape))
  logp = jax.nn.log_softmax(out.logits[:, start - 1:stop - 1].astype(jnp.float32), -1)
  ar_nll = -float(jnp.take_along_axis(logp, jnp.asarray(rows[:, start:stop, None]), -1).sum())
  count = rows.shape[0] * (stop - start)
  return {'asarm_prefix_suffix': asarm_nll(rows) / count,
          'asarm_prefix_only': asarm_nll(prefix) / count, 'ar_prefix_only': ar_nll / count,
          'span_tokens': count}


def speed_rows(asarm, ar, prompts, templates, drafts, batch_sizes, temperatures, max_new,
               repeats) -> list[dict]:
  """One record per (task, batch size, temperature, method): NFE per token, tokens/s,
  speedup over sequential any-order decoding."""
  from launch import generation
  rows = []
  for task, inputs in (('continuation', prompts), ('infill', templates)):
    infill = task == 'infill'
    for batch in batch_sizes:
      for temperature in temperatures:
        options = generation.DecodeOptions(max_new_tokens=max_new, temperature=temperature,
                                           batch_size=batch, infill=infill)
        runs = [('any_order', options)] + [
            ('assd', dataclasses.replace(options, num_draft=k)) for k in drafts]
        if not infill and ar is not None:
          runs.insert(0, ('autoregressive', options))
        base = None
        for method, opts in runs:
          model = ar if method == 'autoregressive' else asarm
          _, stats = generation.decode_tokens(model, inputs, method, opts, repeats=repeats)
          record = {'task': task, 'batch': batch, 'temperature': temperature, 'method': method,
                    'k': opts.num_draft if method == 'assd' else None,
                    'new_tokens': stats['new_tokens'], 'tokens_per_s': stats['tokens_per_s'],
                    'nfe_per_token': (stats['nfe'] / max(stats['new_tokens'], 1)
                                      if 'nfe' in stats else None)}
          if method == 'any_order':
            base = record['tokens_per_s']
          record['speedup'] = (record['tokens_per_s'] / base if base and method != 'autoregressive'
                               else None)
          rows.append(record)
  return rows


def table(rows) -> str:
  """The speed records as a Markdown table."""
  lines = ['| task | batch | T | method | NFE/token | tokens/s | speedup vs sequential |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    name = r['method'] + (f' k={r["k"]}' if r['k'] else '')
    nfe = '' if r['nfe_per_token'] is None else f'{r["nfe_per_token"]:.2f}'
    speed = '' if r['speedup'] is None else f'{r["speedup"]:.2f}x'
    lines.append(f'| {r["task"]} | {r["batch"]} | {r["temperature"]:g} | {name} | {nfe} | '
                 f'{r["tokens_per_s"]:.1f} | {speed} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  common.setup_logging()
  import numpy as np
  from decoding import any_subset
  from training import checkpoints
  with common.user_errors_as_messages():
    if not _ASARM.value:
      raise ValueError('Give --asarm_workdir=DIR (an AS-ARM, configs/asarm.py).')
    asarm = checkpoints.restore_model(_ASARM.value)
    any_subset.check_model(asarm.model)
    ar = checkpoints.restore_model(_AR.value) if _AR.value else None
    if ar is not None and ar.tokenizer.fingerprint() != asarm.tokenizer.fingerprint():
      raise ValueError('The AR model and the AS-ARM use different tokenizers: their NLLs per '
                       'token do not compare.')
    window, span = _WINDOW.value, _SPAN.value
    start = (window - span) // 2
    if not 0 < start and start + span < window:
      raise ValueError(f'--span_len={span} leaves no prefix and suffix in --infill_len={window}.')
    texts = windows(asarm, max(_NLL_ROWS.value, _PROMPTS.value), window)
    report = {}
    if ar is not None:
      report['infill_nll'] = infill_nll(asarm, ar, texts[:_NLL_ROWS.value], (start, start + span))
    prompts = [t[:_PROMPT_LEN.value].tolist() for t in texts[:_PROMPTS.value]]
    mask = asarm.model.mask_id
    templates = [np.concatenate([t[:start], np.full(span, mask), t[start + span:]]).tolist()
                 for t in texts[:_PROMPTS.value]]
    report['speed'] = speed_rows(asarm, ar, prompts, templates, [int(k) for k in _DRAFTS.value],
                                 [int(b) for b in _BATCHES.value],
                                 [float(t) for t in _TEMPS.value], _MAX_NEW.value,
                                 _REPEATS.value)
  if _JSON.value:
    print(json.dumps(report))
    return
  if 'infill_nll' in report:
    n = report['infill_nll']
    print(f'infilling NLL (nats/token, {n["span_tokens"]} span tokens): AS-ARM prefix+suffix '
          f'{n["asarm_prefix_suffix"]:.3f}, AS-ARM prefix only {n["asarm_prefix_only"]:.3f}, '
          f'AR prefix only {n["ar_prefix_only"]:.3f}')
  print(table(report['speed']))


if __name__ == '__main__':
  app.run(main)
