"""Our compiled decoders against `transformers` on the same weights, same machine, same run:

  python -m launch.compare_hf --workdir=workdirs/ar_small --draft_workdir=workdirs/draft_small

Each workdir (trained here or imported with launch.convert) is exported to the Hugging
Face layout; `transformers` loads that directory and our decoders run on the parameters
imported back from the same safetensors file (training/hf.py), so both read identical
weights. Greedy, validation prompts of the embedded corpus, median of --repeats runs
after a warm-up (which compiles ours). Reports tokens/s, whether outputs match, and
ratios:
  ours autoregressive vs transformers `generate`, at each batch size;
  ours speculative (chain of --num_draft) vs transformers assisted generation
  (`assistant_model=`, its speculative decoding; batch 1, the only size it supports).
Needs the `hf` extra (torch, transformers).
"""
import dataclasses
import json
import os
import tempfile

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'Target workdir (an autoregressive LM).')
_DRAFT = flags.DEFINE_string('draft_workdir', None, 'Draft workdir for the speculative pair.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Rows per call.')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 8, 'Validation prompts.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Tokens per prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'New tokens per prompt.')
_NUM_DRAFT = flags.DEFINE_integer('num_draft', 4, 'Our speculative chain length K.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs (median reported).')
_OUT = flags.DEFINE_string('out', None, 'Write the records here as JSON.')
flags.mark_flags_as_required(['workdir'])


def _imported(workdir: str, directory: str):
  """(restored model on the weights read back from its export, transformers model)."""
  import torch
  import transformers
  from launch import conversion
  from training import checkpoints, hf
  conversion.export_hf(workdir, directory)
  restored = checkpoints.restore_model(workdir)
  restored = dataclasses.replace(restored, params=hf.load_params(directory,
                                                                 restored.model.config))
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                                dtype=torch.float32).eval()
  return restored, reference


def _hf_generate(model, prompts, batch_size, max_new, eos, repeats, assistant=None):
  """-> (transformers' greedy completions, wall seconds): launch.baselines.hf_generate."""
  from launch import baselines
  completions, stats = baselines.hf_generate(model, prompts, batch_size, max_new, eos, eos,
                                             repeats, assistant=assistant)
  return completions, stats['wall_s']


def compare(workdir, draft_workdir, batch_sizes, num_prompts, prompt_len, max_new, num_draft,
            repeats) -> list[dict]:
  import torch
  from launch import benchmarking, generation
  torch.set_num_threads(os.cpu_count() or 1)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    target, reference = _imported(workdir, os.path.join(tmp, 'target'))
    prompts = benchmarking.validation_prompts(target, num_prompts, prompt_len)
    eos = target.tokenizer.eos_id
    options = generation.DecodeOptions(max_new_tokens=max_new, max_context=prompt_len + max_new,
                                       num_draft=num_draft)

    def add(name, batch, ours, theirs, ours_stats, their_wall, what):
      their_tokens = sum(len(c) for c in theirs)
      records.append(dict(
          comparison=name, batch_size=batch, ours=what[0], theirs=what[1],
          ours_tokens_per_s=ours_stats['tokens_per_s'],
          theirs_tokens_per_s=their_tokens / their_wall,
          speedup=ours_stats['tokens_per_s'] / (their_tokens / their_wall),
          outputs_match=ours == theirs, ours_target_calls=ours_stats['target_calls'],
          ours_mean_accepted=ours_stats.get('mean_accepted', 1.0),
          ours_compile_s=ours_stats['compile_s']))
      print(json.dumps(records[-1]))

    for batch in batch_sizes:
      opts = dataclasses.replace(options, batch_size=batch)
      ours, stats = generation.decode_tokens(target, prompts, 'autoregressive', opts,
                                             repeats=repeats)
      theirs, wall = _hf_generate(reference, prompts, batch, max_new, eos, repeats)
      add('greedy', batch, ours, theirs, stats, wall, ('autoregressive', 'generate'))
    if draft_workdir:
      draft, draft_reference = _imported(draft_workdir, os.path.join(tmp, 'draft'))
      opts = dataclasses.replace(options, batch_size=1)
      ours, stats = generation.decode_tokens(target, prompts, 'speculative', opts, draft,
                                             repeats=repeats)
      theirs, wall = _hf_generate(reference, prompts, 1, max_new, eos, repeats,
                                  assistant=draft_reference)
      add('speculative', 1, ours, theirs, stats, wall,
          (f'speculative (chain K={num_draft})', 'assisted generation'))
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  with common.user_errors_as_messages():
    records = compare(_WORKDIR.value, _DRAFT.value, [int(b) for b in _BATCH_SIZES.value],
                      _NUM_PROMPTS.value, _PROMPT_LEN.value, _MAX_NEW.value, _NUM_DRAFT.value,
                      _REPEATS.value)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(records, f, indent=1)
  print('| comparison | batch | ours | transformers | ours tok/s | transformers tok/s | '
        'ratio | outputs match |')
  print('|---|---|---|---|---|---|---|---|')
  for r in records:
    print(f'| {r["comparison"]} | {r["batch_size"]} | {r["ours"]} | {r["theirs"]} | '
          f'{r["ours_tokens_per_s"]:.0f} | {r["theirs_tokens_per_s"]:.0f} | '
          f'{r["speedup"]:.2f} | {r["outputs_match"]} |')


if __name__ == '__main__':
  app.run(main)
