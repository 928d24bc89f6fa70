"""Decode from a trained workdir:

  python -m launch.decode --workdir=DIR --method=autoregressive --prompt='def main(' [--json]
  python -m launch.decode --workdir=DIR --prompt_file=prompts.txt --temperature=0.8 --top_p=0.9
  python -m launch.decode --workdir=SMOLLM2 --chat --prompt='Write a haiku about rain.'
  python -m launch.decode --workdir=SMOLLM2 --dtype=bfloat16 --prompt='...'  # f32 weights, bf16 math
  python -m launch.decode --workdir=SMOLLM2 --chat --prompt_file=question.jsonl  # Spec-Bench
  python -m launch.decode --workdir=TARGET --method=speculative --draft_workdir=DRAFT \
      --num_draft=4 [--adaptive_threshold=0.3 | --tree=3,2,1 | --tree=dynamic:4,5,24]
  python -m launch.decode --workdir=TARGET --method=medusa --heads_workdir=HEADS \
      [--tree=4,2,2 --typical]
  python -m launch.decode --workdir=TARGET --method=eagle --heads_workdir=EAGLE \
      [--tree=dynamic:4,5,24]
  python -m launch.decode --workdir=TARGET --method=eagle3 --heads_workdir=EAGLE3 \
      [--tree=dynamic:4,5,24]
  python -m launch.decode --workdir=MTP_MODEL --method=mtp [--tree=1,1,1 (a chain)]
  python -m launch.decode --workdir=TIDAR_MODEL --method=tidar [--chain_rule=token]
  python -m launch.decode --workdir=DIR --method=lookahead [--lookahead_window=5 \
      --lookahead_ngram=5 --lookahead_candidates=5]
  python -m launch.decode --workdir=BD3LM --method=block_diffusion [--diffusion_steps=8 \
      --diffusion_sampler=ancestral|first_hitting]
  python -m launch.decode --workdir=ASARM --method=any_order|assd [--num_draft=4] --prompt='...'
  python -m launch.decode --workdir=ASARM --method=assd --infill \
      --prompt='def add(a, b):\n    return <mask:8>\n'    # <mask> = --max_new_tokens tokens
  python -m launch.decode --workdir=EARLY_EXIT --method=early_exit [--exit_threshold=0.9 \
      --exit_confidence=softmax|top2|state|classifier --exit_layers=2,4]   # CALM, LOSSY
  python -m launch.decode --workdir=TARGET --method=parallel_draft --draft_workdir=PDRAFT \
      [--block_size=8] [--tree=best:16,4]
  python -m launch.decode --workdir=DIR --plugins=my.module --method=my_method ...

One --tree for every method that drafts a tree: children per depth ("3,2,1"), sparse
node paths ("paths:0;1;0.0", e.g. from launch.tune_tree), or an EAGLE-2 dynamic tree
("dynamic:TOP_K,DEPTH,BUDGET"), or a parallel drafter's best-first tree
("best:BUDGET[,TOP_K]"). Methods are the entries of decoding/registry.py;
--plugins imports modules that register more.

--chat renders each prompt as one user message with the model's chat template (as
transformers' apply_chat_template(..., add_generation_prompt=True) does) and decoding
stops at every end-of-sequence and end-of-turn id. Prompt files: one prompt per line,
or .jsonl lines {"messages": [...]} (multi-turn chat, always rendered with the
template; a final assistant message is a reply prefix the model continues, as with
transformers' continue_final_message), {"prompt": "..."} or Spec-Bench's
{"question_id", "category", "turns"} (--turn, the first by default); outputs keep
"category" and "id".

With --json, stdout holds exactly one JSON object (logs go to stderr):
  {"method", "outputs": [{"prompt", "completion", "tokens"}],
   "stats": {"new_tokens", "target_calls", "prefill_calls", "wall_s", "tokens_per_s",
             "compile_s"}}
("target_calls" counts each batch's prefill as one call; "prefill_calls" is the forward
calls the prefills took, one per chunk of --prefill_chunk tokens. With --num_draft=auto
or --tree=auto, "method" is the method that ran, plain autoregressive decoding where the
cost model chose it, and "requested_method" the one asked for.)
speculative adds "mean_accepted", "draft_calls" and "accepted_histogram" to stats;
block_diffusion, any_order and assd add "nfe" (model calls the rows needed, summed over
rows); with --infill "completion" is the template with its spans filled; early_exit
(LOSSY) adds "exit_layers", "exit_histogram" (row-tokens per exit, the last = the full
model), "mean_exit_layer", "blocks_per_step", "threshold" and "confidence".

Multi-process (every process runs the same command; process 0 prints):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or the environment
  variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or --distributed
  on a cluster JAX detects (TPU pod slice, SLURM, Open MPI); locally:
  python -m launch.local_cluster --processes=2 --devices_per_process=4 -- launch.decode ...
"""
import dataclasses
import json
import sys

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (checkpoint + tokenizer).')
_METHOD = flags.DEFINE_string('method', 'autoregressive', 'Decoding method.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt text (repeatable).')
_PROMPT_FILE = flags.DEFINE_string(
    'prompt_file', None, 'One prompt per line (JSON-escaped strings allowed), or .jsonl: '
    '{"messages": [...]}, {"prompt": ...} or Spec-Bench {"question_id", "category", "turns"}.')
_CHAT = flags.DEFINE_bool('chat', False, 'Render each prompt as a user message with the '
                          'model\'s chat template.')
_TURN = flags.DEFINE_integer('turn', 0, 'Spec-Bench files: which turn of each question.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per prompt, at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens; 0 = off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus mass in (0, 1]; 1 = off.')
_MIN_P = flags.DEFINE_float('min_p', 0.0, 'Keep p >= min_p * max p; 0 = off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Prompts per call; 0 = all (at most 8).')
_MAX_CONTEXT = flags.DEFINE_integer(
    'max_context', 0, "Prompt + new tokens, at most; 0 = the model's context length "
    '(config.json context_length: 8192 for SmolLM2; 4096 for models trained here; times '
    'the rope factor for dynamic NTK scaling).')
_PREFILL_CHUNK = flags.DEFINE_integer(
    'prefill_chunk', 256, 'Prompt tokens per prefill call (a long prompt goes through the '
    'model in equal chunks, decoding.driver.chunked_prefill); 0 = one call.')
_MODEL_PARALLEL = flags.DEFINE_integer('model_parallelism', 1, 'Mesh model axis size.')
_MESH_SHAPE = flags.DEFINE_string('mesh_shape', '', 'Mesh shape over all processes\' devices, '
                                  'e.g. fsdp=8 or data=2,fsdp=4 (models/sharding.py).')
common.define_distributed_flags()
_DRAFT = flags.DEFINE_string('draft_workdir', None, 'speculative: the draft model workdir; '
                             'parallel_draft: the parallel drafter\'s.')
_NUM_DRAFT = flags.DEFINE_string('num_draft', '4', 'speculative, lookup: drafted tokens per '
                                  'round, or auto (the cost model picks it, or plain decoding).')
_ADAPTIVE = flags.DEFINE_float('adaptive_threshold', 0.0,
                               'speculative: stop drafting after a token the draft gives '
                               'less than this probability (0 = always K).')
_CHAIN_RULE = flags.DEFINE_enum('chain_rule', 'block', ['block', 'token'],
                                'speculative chains: block verification (Sun et al. 2025) '
                                'or the token-level rule.')
_TREE_RULE = flags.DEFINE_enum('tree_rule', 'rrsw', ['rrsw', 'specinfer'],
                               'draft trees under sampling: children drawn without '
                               'replacement, recursive rejection sampling without '
                               'replacement (rrsw), or SpecInfer\'s i.i.d. / top-k children.')
_TREE = flags.DEFINE_string(
    'tree', '', 'The draft tree: children per depth like 3,2,1 (Medusa/MTP: head d\'s '
    'top-b_d), sparse paths like paths:0;1;0.0, or EAGLE-2 dynamic:TOP_K,DEPTH,BUDGET. '
    '"" = the method\'s default (speculative: a chain of --num_draft; medusa/mtp: the '
    'tuned tree, else 4,2,2; eagle: dynamic:4,5,24); medusa/mtp: auto = the size the cost '
    'model picks from a calibration (launch/autotune.py), which may be plain decoding; '
    'eagle/eagle3: auto = the dynamic tree\'s budget picked the same way.')
_HEADS = flags.DEFINE_string('heads_workdir', None,
                              'medusa, eagle: the heads\' (drafter\'s) training workdir.')
_PLUGINS = flags.DEFINE_list('plugins', [], 'Modules that register more decoding methods '
                             '(decoding/registry.py).')
_TYPICAL = flags.DEFINE_bool('typical', False, 'medusa, mtp: typical acceptance (LOSSY).')
_LOOKUP_MAX = flags.DEFINE_integer('lookup_max_ngram', 3,
                                   'lookup: longest suffix n-gram matched in the row.')
_LOOKUP_MIN = flags.DEFINE_integer('lookup_min_ngram', 1,
                                   'lookup: shortest n-gram; no match = no draft.')
_LOOKUP_BRANCHES = flags.DEFINE_integer('lookup_branches', 1,
                                        'lookup: matches per round (> 1 = a tree).')
_JACOBI_WINDOW = flags.DEFINE_string('jacobi_window', '4',
                                     'jacobi: guesses refined per target call, or auto.')
# None = the method's default (decoding/lookahead.py, read through DecodeOptions).
_LOOKAHEAD = {
    'lookahead_window': flags.DEFINE_integer(
        'lookahead_window', None, 'lookahead: W, columns of the 2-D Jacobi window.'),
    'lookahead_ngram': flags.DEFINE_integer(
        'lookahead_ngram', None, 'lookahead: N, the n-gram size (N - 1 window levels).'),
    'lookahead_candidates': flags.DEFINE_integer(
        'lookahead_candidates', None, 'lookahead: G, pool n-grams verified per round.')}
_DIFFUSION_STEPS = flags.DEFINE_integer(
    'diffusion_steps', None, 'block_diffusion: ancestral denoising steps per block '
    '(default: the block size).')
_DIFFUSION_SAMPLER = flags.DEFINE_string(
    'diffusion_sampler', 'ancestral', 'block_diffusion: ancestral | first_hitting.')
_SKIP = flags.DEFINE_string('skip_layers', '', 'self_speculative: the blocks the draft '
                            'skips ("3,5,9-11"); default: the workdir\'s skip set '
                            '(launch.skip_search), else exit at half depth.')
_EXIT = flags.DEFINE_integer('exit_layer', 0, 'self_speculative: draft with the first E '
                             'blocks (early exit), 1 <= E < layers.')
_INFILL = flags.DEFINE_bool('infill', False, 'any_order, assd: each prompt is a template; '
                            'fill its <mask:N> (N tokens) and <mask> (--max_new_tokens) spans.')
_EXIT_THRESHOLD = flags.DEFINE_float(
    'exit_threshold', None, 'early_exit (CALM, LOSSY): exit when the confidence is >= this, '
    'in [0, 1] (1 = never); default: the workdir\'s calibrated threshold '
    '(launch.calibrate_exit), else 0.9.')
_EXIT_CONFIDENCE = flags.DEFINE_string(
    'exit_confidence', 'softmax', 'early_exit: softmax | top2 | state | classifier.')
_EXIT_LAYERS = flags.DEFINE_string('exit_layers', '', 'early_exit: the exits used ("2,4"); '
                                   'default: all the model\'s.')
_BLOCK = flags.DEFINE_integer('block_size', 0, 'parallel_draft: tokens per verified block '
                               '(the root + drafted positions), 2 .. the drafter\'s trained '
                               'block; 0 = the trained block. Its tree: --tree=best:BUDGET[,TOP_K].')
_WEIGHT_LAYOUT = flags.DEFINE_string(
    'weight_layout', 'auto', 'How the target\'s block weights are held: auto (the decoding '
    'layout on one CPU device, else stacked) | stacked (as stored) | per_block (each block\'s '
    'fused matrices in their own buffers, [out, in] for AR at batch 1, else [in, out]; one '
    'device). launch/generation.decoding_params.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object on stdout.')
_DTYPE = flags.DEFINE_string('dtype', '', 'Decode in this dtype, weights and activations '
                             '(float32 | bfloat16); default: the checkpoint\'s.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.setup_logging()
  from decoding import registry
  from launch import generation
  from training import checkpoints
  with common.user_errors_as_messages():
    common.init_distributed()
    texts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
      texts += generation.read_prompt_file(_PROMPT_FILE.value, turn=_TURN.value)
    if not texts:
      raise ValueError('Give --prompt=TEXT or --prompt_file=FILE.')
    registry.load_plugins(_PLUGINS.value)
    method = registry.get(_METHOD.value)
    options = generation.DecodeOptions(
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, min_p=_MIN_P.value, seed=_SEED.value, batch_size=_BATCH.value,
        max_context=_MAX_CONTEXT.value, prefill_chunk=_PREFILL_CHUNK.value,
        model_parallelism=_MODEL_PARALLEL.value,
        mesh_shape=_MESH_SHAPE.value,
        num_draft=generation.draft_length(_NUM_DRAFT.value, 'num_draft'),
        adaptive_threshold=_ADAPTIVE.value, chain_rule=_CHAIN_RULE.value, tree=_TREE.value,
        typical=_TYPICAL.value, tree_rule=_TREE_RULE.value,
        lookup_max_ngram=_LOOKUP_MAX.value, lookup_min_ngram=_LOOKUP_MIN.value,
        lookup_branches=_LOOKUP_BRANCHES.value,
        jacobi_window=generation.draft_length(_JACOBI_WINDOW.value, 'jacobi_window'),
        diffusion_steps=_DIFFUSION_STEPS.value, diffusion_sampler=_DIFFUSION_SAMPLER.value,
        skip_layers=_SKIP.value, exit_layer=_EXIT.value, plugins=tuple(_PLUGINS.value),
        infill=_INFILL.value,
        exit_threshold=_EXIT_THRESHOLD.value, exit_confidence=_EXIT_CONFIDENCE.value,
        exit_layers=_EXIT_LAYERS.value,
        block_size=_BLOCK.value, weight_layout=_WEIGHT_LAYOUT.value,
        **{name: flag.value for name, flag in _LOOKAHEAD.items() if flag.value is not None})
    options.sampling()
    generation.effective_layout(options.weight_layout, 1)   # checked before restoring
    second = {'draft_workdir': _DRAFT.value, 'heads_workdir': _HEADS.value}.get(method.second)
    if method.second and not second:
      raise ValueError(f'--method={method.name} needs --{method.second}=DIR (its trained '
                       f'{"draft" if method.second == "draft_workdir" else "heads"}).')
    if _DTYPE.value and _DTYPE.value not in checkpoints.DTYPES:
      raise ValueError(f'--dtype={_DTYPE.value}; expected one of {", ".join(checkpoints.DTYPES)}.')
    if _MAX_CONTEXT.value < 0:
      raise ValueError(f'--max_context={_MAX_CONTEXT.value}; expected >= 1, or 0 for the '
                       "model's context length.")
    restored = checkpoints.restore_model(_WORKDIR.value)
    draft = checkpoints.restore_model(second) if second else None
    from models import rope
    from training import hf
    context, c = hf.context_length(restored.config), restored.model.config
    if rope.depends_on_call(c):
      # Dynamic NTK declares its original context (max_position_embeddings) and
      # stretches the rotation past it: the factor is the extension it is set up for.
      context = int(context * c.rope_factor)
    if _MAX_CONTEXT.value > context:
      raise ValueError(f'--max_context={_MAX_CONTEXT.value} is beyond the model\'s context '
                       f'length ({context} tokens); expected at most {context}, or 0.')
    if not _MAX_CONTEXT.value:   # the cache is still sized to the longest prompt + new tokens
      options = dataclasses.replace(options, max_context=context)
    if _DTYPE.value:
      restored = checkpoints.with_dtype(restored, _DTYPE.value)
      draft = draft and checkpoints.with_dtype(draft, _DTYPE.value)
    result = generation.decode_texts(restored, texts, _METHOD.value, options, draft,
                                     chat=_CHAT.value)
  if not common.is_main_process():  # Every process has the outputs; process 0 prints them.
    return
  if _JSON.value:
    print(json.dumps(result))
    return
  for out in result['outputs']:
    if isinstance(out['prompt'], str) and not _CHAT.value and not _INFILL.value:
      print(f'--- {out["prompt"]!r}\n{out["prompt"]}{out["completion"]}')
    else:  # A chat: the reply alone.
      print(f'--- {out["prompt"]!r}\n{out["completion"]}')
    stop = f' (id {out["stop_id"]})' if 'stop_id' in out else ''
    print(f'--- finish: {out["finish_reason"]}{stop}', file=sys.stderr)
  s = result['stats']
  if 'auto' in s:
    a = s['auto']
    why = a.get('reason') or f'no {a["option"]} predicted to win'
    chosen = (f'{a["option"]}={a.get("tree") or a["chosen"]}' if a['chosen'] else
              f'plain autoregressive decoding ({why})')
    print(f'--- auto: {chosen}; predicted speedup per {a["option"]}: '
          f'{a["predicted_speedup"]}; calibration {a["calibration_s"]:.1f}s', file=sys.stderr)
  extra = (f', mean accepted {s["mean_accepted"]:.2f}, {s["draft_calls"]} draft calls'
           if 'mean_accepted' in s else '')
  if 'exit_histogram' in s:  # CALM early exit (lossy)
    extra += (f', LOSSY early exit at threshold {s["threshold"]:g} ({s["confidence"]}): '
              f'mean exit layer {s["mean_exit_layer"]:.2f}, {s["blocks_per_step"]:.2f} blocks '
              f'per step, row-tokens per exit {dict(zip(s["exit_layers"], s["exit_histogram"]))}')
  if 'nfe' in s:  # block diffusion, any-subset: model calls the rows needed, summed
    extra += f', NFE {s["nfe"]} ({s["nfe"] / max(s["new_tokens"], 1):.2f} per token)'
  print(f'--- {s["new_tokens"]} tokens in {s["wall_s"]:.3f}s ({s["tokens_per_s"]:.1f} tok/s), '
        f'{s["target_calls"]} target calls{extra}, compile {s["compile_s"]:.2f}s',
        file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
