"""Evaluate block diffusion LMs (BD3-LM) against an AR model of the same size.

  python -m launch.bd3lm_eval --ar_workdir=/tmp/ar_tiny \
      --bd3_workdirs=/tmp/bd3_4,/tmp/bd3_8,/tmp/bd3_16 [--steps=1,2,4,0] [--json]
  python -m launch.bd3lm_eval --bd3_workdirs=/tmp/bd3_8 --clip_search   # BD3-LM section 4.2

Per BD3-LM workdir:
  * validation bits per byte: the NELBO bound (the objective's eval over the whole time
    range) next to the AR model's NLL, on the same validation batches;
  * for each denoising-steps setting (--steps; 0 = the first-hitting sampler): the
    generative perplexity of its samples under the AR model (exp of the AR model's mean
    NLL of the sampled tokens given the prompt) and their entropy (bits per token of each
    sample's own unigram distribution, averaged: low values flag degenerate repetition,
    as MDLM / BD3-LM report), and NFE per generated token;
  * tokens/s at batch 1 and --num_samples (8) per setting, next to AR decoding
    (launch.generation.decode_tokens, the same timing as launch.bench: compile
    excluded, median of --repeats).
--clip_search: the interval [beta, omega] of mask rates with the smallest training-loss
variance on validation batches (training/objectives/block_diffusion.clip_search), to
fine-tune with --config.bd3lm.schedule=clipped --config.bd3lm.clip=BETA,OMEGA.
"""
import json

from absl import app, flags

from launch import common

_AR = flags.DEFINE_string('ar_workdir', None, 'The AR model of the same size (scores samples).')
_BD3 = flags.DEFINE_list('bd3_workdirs', [], 'BD3-LM workdirs (configs/bd3lm.py).')
_STEPS = flags.DEFINE_list('steps', ['1', '2', '4', '0'], 'Denoising steps per block to '
                           'sample with; 0 = the first-hitting sampler; B = the block size.')
_SAMPLES = flags.DEFINE_integer('num_samples', 8, 'Samples per setting.')
_LENGTH = flags.DEFINE_integer('sample_len', 64, 'New tokens per sample.')
_PROMPT = flags.DEFINE_string('prompt', 'def ', 'The samples\' prompt.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus mass of the samples (1 = off).')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 8, 'Validation batches for bits/byte.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per speed figure (median).')
_CLIP = flags.DEFINE_bool('clip_search', False, 'Search the clipped schedule\'s interval.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')


def _validation(restored, num_batches):
  from training import data
  config = restored.config
  sources = data.load_sources(config.data)
  return list(data.eval_batches(sources['validation'], restored.tokenizer,
                                batch_size=config.batch_size, seq_len=config.seq_len,
                                num_batches=num_batches))


def bits_per_byte(restored, batches) -> float:
  """The objective's eval bits per byte (the NELBO bound for a BD3-LM) on `batches`."""
  import jax
  from training import objectives
  objective = objectives.build(restored.config, restored.tokenizer.vocab_size)
  sums_fn = jax.jit(lambda params, batch, key: objective.eval_sums(params, batch, key, 0))
  totals = None
  for i, batch in enumerate(batches):
    sums = sums_fn(restored.params, batch, jax.random.PRNGKey(i))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return objectives.summarize(jax.device_get(totals))['bits_per_byte']


def main(argv):
  del argv
  common.setup_logging()
  from launch import benchmarking, generation
  from training import checkpoints
  report = {}
  with common.user_errors_as_messages():
    if not _BD3.value:
      raise ValueError('Give --bd3_workdirs=DIR[,DIR...].')
    ar = checkpoints.restore_model(_AR.value) if _AR.value else None
    prompt_ids = ar.tokenizer.encode_prompt(_PROMPT.value).tolist() if ar else None
    if ar is not None:
      batches = _validation(ar, _EVAL_BATCHES.value)
      report['ar'] = {'bits_per_byte': bits_per_byte(ar, batches)}
      options = generation.DecodeOptions(max_new_tokens=_LENGTH.value, temperature=1.0,
                                         top_p=_TOP_P.value)
      done, _ = generation.decode_tokens(ar, [prompt_ids] * _SAMPLES.value, 'autoregressive',
                                         options)
      report['ar'].update(benchmarking.sample_quality(ar, prompt_ids, done))
      for batch in sorted({1, _SAMPLES.value}):
        _, stats = generation.decode_tokens(
            ar, [prompt_ids] * batch, 'autoregressive',
            generation.DecodeOptions(max_new_tokens=_LENGTH.value, temperature=1.0,
                                     top_p=_TOP_P.value, batch_size=batch),
            repeats=_REPEATS.value)
        report['ar'][f'tokens_per_s_b{batch}'] = stats['tokens_per_s']
    for workdir in _BD3.value:
      restored = checkpoints.restore_model(workdir)
      block = restored.model.block_size
      row = report[workdir] = {'block_size': block}
      batches = _validation(restored, _EVAL_BATCHES.value)
      row['bits_per_byte_bound'] = bits_per_byte(restored, batches)
      if _CLIP.value:
        import jax
        from training import objectives
        from training.objectives import block_diffusion
        objective = objectives.build(restored.config, restored.tokenizer.vocab_size)
        found = block_diffusion.clip_search(objective, restored.params, batches,
                                            jax.random.PRNGKey(0))
        row['clip_search'] = {k: found[k] for k in ('beta', 'omega', 'variance')}
        row['clip_search']['full_range_variance'] = next(
            v for b, o, _, v in found['table'] if (b, o) == (0.0, 1.0))
      ids = prompt_ids or restored.tokenizer.encode_prompt(_PROMPT.value).tolist()
      for text in _STEPS.value:
        steps = block if text == 'B' else int(text)
        sampler = 'first_hitting' if steps == 0 else 'ancestral'
        options = generation.DecodeOptions(
            max_new_tokens=_LENGTH.value, temperature=1.0, top_p=_TOP_P.value,
            diffusion_steps=steps or None, diffusion_sampler=sampler)
        done, stats = generation.decode_tokens(restored, [ids] * _SAMPLES.value,
                                               'block_diffusion', options,
                                               repeats=_REPEATS.value)
        key = 'first_hitting' if steps == 0 else f'T={steps}'
        row[key] = {'nfe_per_token': stats['nfe'] / max(stats['new_tokens'], 1),
                    f'tokens_per_s_b{_SAMPLES.value}': stats['tokens_per_s']}
        if ar is not None:
          row[key].update(benchmarking.sample_quality(ar, ids, done))
        _, stats = generation.decode_tokens(restored, [ids], 'block_diffusion', options,
                                            repeats=_REPEATS.value)
        row[key]['tokens_per_s_b1'] = stats['tokens_per_s']
  print(json.dumps(report, indent=None if _JSON.value else 1))


if __name__ == '__main__':
  app.run(main)
