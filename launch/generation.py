"""Text in, text out: decode prompts with a restored model and any decoding method.

Used by launch.decode and launch.bench:

    restored = checkpoints.restore_model(workdir)
    result = generation.decode_texts(restored, ['def main('], method='autoregressive',
                                     options=generation.DecodeOptions(max_new_tokens=32))
    result['outputs'][0]['completion'], result['stats']['tokens_per_s']
"""
import dataclasses
import json
import re
import time

import flax.linen as nn
import jax
import numpy as np

from decoding import driver, lookahead, registry
from decoding.sampling import SamplingConfig
from launch import timing, tree_tuning
from models import sharding


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  max_new_tokens: int = 64
  temperature: float = 0.0      # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: int = 0
  batch_size: int = 0           # prompts per call; 0 = all of them (at most 8)
  max_context: int = 1024       # cache capacity limit: prompt + new tokens
  # prompt tokens per prefill call (decoding.driver.chunked_prefill); 0 = one call
  prefill_chunk: int = driver.PREFILL_CHUNK
  model_parallelism: int = 1    # size of the mesh's model axis
  mesh_shape: str = ''          # e.g. 'fsdp=8' (models/sharding.py); '' = data x model
  # speculative chains, lookup: tokens drafted per round, at most; 'auto' = the cost
  # model's choice (launch/autotune.py), which may be plain decoding
  num_draft: int | str = 4
  adaptive_threshold: float = 0.0  # speculative chains: stop drafting after an unsure token
  chain_rule: str = 'block'     # speculative chains: 'block' verification or 'token'-level
  # The draft tree, one name for every method that drafts one: children per depth
  # ('3,2,1'; Medusa/MTP: head d's top-b_d), sparse node paths ('paths:0;1;0.0'), or an
  # EAGLE-2 tree ('dynamic:TOP_K,DEPTH,BUDGET'). '' = the method's default: a chain for
  # speculative, the heads' tuned tree (launch.tune_tree) else 4,2,2 for medusa / mtp,
  # dynamic:4,5,24 for eagle. 'auto' (medusa, mtp): the tree size the cost model picks.
  tree: str = ''
  typical: bool = False         # medusa, mtp: typical acceptance (LOSSY)
  # trees under sampling (speculative, medusa, mtp, eagle): children drawn without
  # replacement and verified by 'rrsw', or SpecInfer's i.i.d. / top-k children ('specinfer')
  tree_rule: str = 'rrsw'
  # lookup (decoding/lookup.py; num_draft is its K): the longest and shortest suffix
  # n-gram matched in the row's own tokens, and how many matches make its tree (1 = chain).
  lookup_max_ngram: int = 3
  lookup_min_ngram: int = 1
  lookup_branches: int = 1
  jacobi_window: int | str = 4  # jacobi (decoding/jacobi.py): guesses refined per call; 'auto'
  # lookahead (Fu et al. 2024): W window columns, N-gram size (N - 1 levels), G candidates
  lookahead_window: int = lookahead.DEFAULT_WINDOW
  lookahead_ngram: int = lookahead.DEFAULT_NGRAM
  lookahead_candidates: int = lookahead.DEFAULT_CANDIDATES
  # block_diffusion (decoding/block_diffusion.py): denoising steps per block (None = the
  # block size) and the sampler (ancestral | first_hitting)
  diffusion_steps: int | None = None
  diffusion_sampler: str = 'ancestral'
  # self_speculative (decoding/self_speculative.py): the blocks the draft skips ('3,5,9-11'),
  # or exit_layer E: draft with the first E blocks. Neither = the workdir's skip set
  # (launch.skip_search), else exit at half depth.
  skip_layers: str = ''
  exit_layer: int = 0
  # early_exit (decoding/early_exit.py, CALM, LOSSY): the confidence threshold in [0, 1]
  # (None = the workdir's calibrated one, launch.calibrate_exit, else 0.9), the measure
  # (softmax | top2 | state | classifier) and the exits used ('2,4'; '' = the model's).
  exit_threshold: float | None = None
  exit_confidence: str = 'softmax'
  exit_layers: str = ''
  # parallel_draft (decoding/parallel_drafter.py): tokens per verified block (the root +
  # drafted positions), 2 .. the drafter's trained block; 0 = the trained block
  block_size: int = 0
  plugins: tuple[str, ...] = ()  # modules that register more methods (decoding/registry.py)
  # any_order, assd (decoding/any_subset.py): each prompt is an infilling template whose
  # mask markers (INFILL_MARKER) are filled, instead of a prompt to continue
  infill: bool = False
  # How the target's block weights are held (decoding_params): 'auto' = the decoding
  # layout on a one-device CPU run, else stacked; 'stacked' = as stored; 'per_block' =
  # the decoding layout, decoding on the first device alone
  weight_layout: str = 'auto'

  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p)


# An infilling span in a prompt: <mask:N> is N tokens to fill, <mask> is max_new_tokens.
INFILL_MARKER = re.compile(r'<mask(?::(\d+))?>')


def infill_template(tokenizer, text: str, mask_id: int, span: int, capacity: int) -> list[int]:
  """The token template of an infilling prompt: the text between mask markers encoded
  (the first piece as a prompt, with the tokenizer's BOS), each marker `<mask:N>`
  replaced by N [MASK] ids (mask_id) and `<mask>` by `span` of them.
  Raises ValueError for a text without a marker, a marker of 0 tokens, or a template
  (text and spans) longer than `capacity` tokens."""
  pieces = INFILL_MARKER.split(text)      # text, N or None, text, N or None, ..., text
  if len(pieces) == 1:
    raise ValueError('--infill: the prompt has no mask marker; mark each span to fill with '
                     '<mask:N> (N tokens) or <mask> (--max_new_tokens tokens).')
  ids = [int(x) for x in tokenizer.encode_prompt(pieces[0])]
  for count, piece in zip(pieces[1::2], pieces[2::2]):
    n = span if count is None else int(count)
    if n < 1:
      raise ValueError(f'--infill: a span of {n} tokens; give <mask:N> with N >= 1.')
    ids += [mask_id] * n + [int(x) for x in tokenizer.encode(piece)]
  if len(ids) > capacity:
    raise ValueError(f'--infill: the template has {len(ids)} tokens with its spans, more than '
                     f'the context ({capacity} tokens): shorten the text or the spans, or '
                     'raise --max_context.')
  return ids


def draft_length(text: str, flag: str) -> int | str:
  """A draft-length flag's value: a positive int or 'auto'. Raises ValueError."""
  if text == 'auto':
    return text
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f'--{flag} must be a positive integer or auto, got {text!r}.') from None
  if value < 1:
    raise ValueError(f'--{flag} must be a positive integer or auto, got {value}.')
  return value


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: plain `text`, or chat `messages` (rendered with the model's chat
  template); `category` and `id` come from benchmark files (Spec-Bench) for reports."""
  text: str | None = None
  messages: tuple | None = None
  category: str = ''
  id: str = ''

  @property
  def label(self) -> str:
    if self.text is not None:
      return self.text
    return self.messages[-1].get('content', '') if self.messages else ''


def _prompt_record(record, where: str, turn: int) -> Prompt:
  """A JSONL object: {"messages": [...]}, {"prompt": "..."} or Spec-Bench's
  {"question_id", "category", "turns": [...]}; optional "category" and "id"."""
  from training import chat
  if not isinstance(record, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}.')
  category = record.get('category', '')
  ident = record.get('question_id', record.get('id', ''))
  if not isinstance(category, str):
    raise ValueError(f'{where}: "category" must be a string.')
  keys = [k for k in ('messages', 'prompt', 'turns') if k in record]
  if len(keys) != 1:
    raise ValueError(f'{where}: expected exactly one of "messages", "prompt" or "turns" '
                     f'(Spec-Bench), got keys {sorted(record)}.')
  if keys[0] == 'messages':
    messages = chat.check_messages(record['messages'], f'{where}: "messages"')
    if chat.continues_reply(messages):
      chat.check_reply_prefix(messages, f'{where}: "messages"')
    return Prompt(messages=tuple(messages), category=category, id=str(ident))
  if keys[0] == 'prompt':
    text = record['prompt']
    if not isinstance(text, str) or not text:
      raise ValueError(f'{where}: "prompt" must be a non-empty string.')
    return Prompt(text=text, category=category, id=str(ident))
  turns = record['turns']
  if (not isinstance(turns, list) or not turns or
      not all(isinstance(t, str) and t for t in turns)):
    raise ValueError(f'{where}: "turns" must be a non-empty list of non-empty strings.')
  if not 0 <= turn < len(turns):
    raise ValueError(f'{where}: turn {turn} asked for, the question has {len(turns)} '
                     f'(turns count from 0).')
  return Prompt(text=turns[turn], category=category, id=str(ident))


def read_prompt_file(path: str, turn: int = 0) -> list[Prompt]:
  """Prompts from a file.

  `.jsonl` or `.json` (any case): one JSON object per line (blank lines skipped):
  {"messages": [{"role", "content"}, ...]} (multi-turn chat, rendered with the model's chat
  template; a final assistant message is continued: chat.encode),
  {"prompt": "..."}, or a Spec-Bench question.jsonl line {"question_id", "category",
  "turns": [...]} (turn `turn`, the first by default); "category" (and "id") are kept.
  Anything else: one prompt per line (blank lines skipped); a line holding a JSON string
  is unescaped (for newlines). A malformed line, an empty JSON string and a file with no
  prompt are one-line ValueErrors naming the file (and line number), as are a file that
  cannot be read (a directory, no permission) and one that is not UTF-8 text.
  """
  prompts = []
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise
  except OSError as e:
    raise ValueError(f'{path}: cannot read the prompt file ({e.strerror}).') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text (byte {e.start}).') from None
  jsonl = path.lower().endswith(('.jsonl', '.json'))
  for number, line in enumerate(lines, 1):
    where = f'{path}:{number}'
    if not line.strip():
      continue
    if jsonl or line.startswith('"'):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg}, column {e.colno}).') from None
      if jsonl:
        prompts.append(_prompt_record(record, where, turn))
        continue
      if not isinstance(record, str):
        raise ValueError(f'{where}: a line starting with \'"\' must be one JSON string.')
      if not record:
        raise ValueError(f'{where}: the prompt is empty ("").')
      line = record
    prompts.append(Prompt(text=line))
  if not prompts:
    raise ValueError(f'{path}: no prompt in the file (it is empty or blank).')
  return prompts


def _as_prompt(item, chat: bool) -> Prompt:
  """str | list of messages | Prompt -> Prompt (a string is a user message with chat)."""
  if isinstance(item, Prompt):
    return item
  if isinstance(item, str):
    return Prompt(text=item)
  if isinstance(item, (list, tuple)):
    return Prompt(messages=tuple(item))
  raise ValueError(f'A prompt is a string, a list of messages or a Prompt, got '
                   f'{type(item).__name__}.')


def encode_prompts(tokenizer, prompts, chat: bool = False) -> list[list[int]]:
  """Token ids of each prompt as the model's own tokenizer gives them: plain text with
  `tokenizer.encode_prompt` (BOS only where the model's tokenizer adds it); messages,
  and with chat=True every text as one user message, rendered with the model's chat
  template and encoded without adding BOS again (apply_chat_template's ids)."""
  from training import chat as chat_lib
  out = []
  for i, item in enumerate(prompts):
    prompt = _as_prompt(item, chat)
    if prompt.messages is not None:
      out.append(chat_lib.encode(tokenizer, list(prompt.messages)).tolist())
      continue
    if not prompt.text:
      raise ValueError(f'Prompt {i} is empty: give some text to continue.')
    if chat:
      out.append(chat_lib.encode(tokenizer, chat_lib.user_message(prompt.text)).tolist())
    else:
      out.append(tokenizer.encode_prompt(prompt.text).tolist())
  return out


def completion_text(tokenizer, prompt_ids, new_ids) -> str:
  """The text the new tokens add after the prompt: decode(prompt + new) minus
  decode(prompt), so prompt text + completion is the generated text whatever the
  decoder does at the start of a text (SentencePiece-style decoders strip the first
  piece's space; byte-level BPE may merge bytes across the boundary). Where the decoder
  rewrites the prompt's end (a partial UTF-8 character), the common prefix is cut."""
  prompt_ids, new_ids = list(prompt_ids), list(new_ids)
  head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
  if full.startswith(head):
    return full[len(head):]
  common = 0
  for a, b in zip(head, full):
    if a != b:
      break
    common += 1
  return full[common:]


def _check_infill(restored, method: str) -> None:
  """Raises ValueError unless `method` fills templates (any_order, assd) and the restored
  model is one it decodes."""
  if method not in ('any_order', 'assd'):
    raise ValueError(f'--infill is an option of any_order, assd, not of --method={method}.')
  registry.get(method).check_model(restored.model)


def infilled_text(tokenizer, template: list[int], filled: list[int], mask_id: int) -> str:
  """The text of an infilling template with its [MASK] ids replaced, left to right, by
  the filled tokens."""
  fill = iter(filled)
  return tokenizer.decode([next(fill) if t == mask_id else t for t in template])


def check_draft(restored, draft) -> None:
  """A draft must encode text as the target does (Tokenizer.fingerprint: vocabulary,
  merges, added tokens; not its own BOS / EOS ids). Embeddings padded to different
  sizes are fine: the draft's logits are put on the target's vocabulary
  (decoding/speculative.conform_vocab)."""
  if draft is not None and draft.tokenizer.fingerprint() != restored.tokenizer.fingerprint():
    raise ValueError(f'The draft in {draft.workdir} uses another tokenizer than the target in '
                     f'{restored.workdir}: it encodes text differently (vocabulary, merges or '
                     'added tokens differ). Use a draft that shares the target\'s tokenizer '
                     '(e.g. a smaller model of the target\'s family, imported), or one trained '
                     f'for this target with --config.target_workdir={restored.workdir}.')


def decode_texts(restored, texts: list, method: str = 'autoregressive',
                 options: DecodeOptions = DecodeOptions(), draft=None,
                 chat: bool = False) -> dict:
  """Decodes `texts` with `method`; returns the launch.decode JSON object as a dict.

  texts: strings, lists of chat messages ([{'role': 'user', 'content': ...}, ...]) or
    Prompt records (read_prompt_file). chat=True renders each string as one user message
    with the model's chat template (messages are always rendered with it).
  restored / draft: checkpoints.RestoredModel of the target and (speculative) the draft.
  Decoding stops at every end-of-sequence and end-of-turn id of the tokenizer (eos_ids).
  """
  if not texts:
    raise ValueError('No prompts given.')
  tokenizer = restored.tokenizer
  prompts = [_as_prompt(t, chat) for t in texts]
  if options.infill:
    if chat:
      raise ValueError('--infill fills a text template; it does not take --chat.')
    _check_infill(restored, method)
    encoded = [infill_template(tokenizer, p.label, restored.model.mask_id,
                               options.max_new_tokens, options.max_context) for p in prompts]
  else:
    encoded = encode_prompts(tokenizer, prompts, chat)
  completions, stats = decode_tokens(restored, encoded, method, options, draft)
  finishes = stats.pop('finish_reasons')
  outputs = []
  for prompt, prompt_ids, ids, finish in zip(prompts, encoded, completions, finishes):
    out = {'prompt': prompt.label if prompt.messages is None else list(prompt.messages),
           'completion': completion_text(tokenizer, prompt_ids, ids), 'tokens': ids,
           'finish_reason': finish['reason']}
    if options.infill:  # The template with its spans filled, and each span's text.
      out['completion'] = infilled_text(tokenizer, prompt_ids, ids, restored.model.mask_id)
    if 'stop_id' in finish:
      out['stop_id'] = finish['stop_id']
    if prompt.category:
      out['category'] = prompt.category
    if prompt.id:
      out['id'] = prompt.id
    outputs.append(out)
  # With num_draft=auto (or tree=auto) the cost model may have run plain decoding instead:
  # `method` is what ran, `requested_method` what was asked for.
  ran = stats.get('auto', {}).get('method', method)
  head = {'method': ran} if ran == method else {'method': ran, 'requested_method': method}
  return {**head, 'outputs': outputs, 'stats': stats}


def _build(restored, method: registry.Method, options: DecodeOptions, capacity: int, draft):
  """-> (the method's config, Drafter, target params) for `restored` and its second model."""
  registry.check_options(method, options)
  method.check_model(restored.model)
  drafter = method.drafter(draft)
  if method.tuned_tree and not options.tree:
    # The tree tuned on validation data for these heads (launch.tune_tree), if any.
    tuned = tree_tuning.load_tuned_tree((draft or restored).workdir)
    options = dataclasses.replace(options, tree=tuned or '')
  if method.workdir_options is not None:
    options = method.workdir_options(options, restored.workdir)
  config = method.make_config(options, capacity, restored.tokenizer.eos_ids, restored.model,
                              drafter.module)
  params = restored.params if drafter.target_params is None else drafter.target_params
  return config, drafter, params


WEIGHT_LAYOUTS = ('auto', 'stacked', 'per_block')
_LAYOUT_CACHE: dict = {}   # {orientation: (params, mesh, their decoding layout)}


def decode_orientation(params, batch: int, one_token_calls: bool) -> str:
  """The decoding layout's orientation (models.transformer.ORIENTATIONS) for a decode of
  `batch` rows: 'rows' ([out, in]) at batch 1 when every target call carries one token
  (XLA:CPU's matrix-vector product reads it fastest), and at batch 1 for every method when
  the block matrices are quantized in groups of 32 and the CPU kernel is built (the
  kernel reads the rows layout for calls of up to quant.KERNEL_MAX_ROWS tokens: SmolLM2's
  Q4_1 file, context 256, T = 1 / 2 / 4 / 8 tokens 9.6 / 12.6 / 18.2 / 28.9 ms against
  21.5 / 22.5 / 25.6 / 35.5 in columns); 'columns' ([in, out]) otherwise, which XLA:CPU's
  matrix-matrix path reads fastest."""
  from models import cpu_kernels, quant
  if batch != 1:
    return 'columns'
  if one_token_calls or (quant.kernel_blocks(params) and cpu_kernels.available()):
    return 'rows'
  return 'columns'


def release_layouts() -> None:
  """Drops the decoding layouts decoding_params keeps (and with them its reference to the
  last parameter tree asked): for a long-lived process done with that model."""
  _LAYOUT_CACHE.clear()


def effective_layout(layout: str, devices: int) -> str:
  """'stacked' or 'per_block': what `layout` (WEIGHT_LAYOUTS) means for a decode on
  `devices` devices of this backend (decoding_params). Raises ValueError for an unknown
  layout or per_block on several devices."""
  if layout not in WEIGHT_LAYOUTS:
    raise ValueError(f'--weight_layout={layout}; expected one of {", ".join(WEIGHT_LAYOUTS)}.')
  if layout == 'per_block' and devices != 1:
    raise ValueError(f'--weight_layout=per_block is for one-device decoding; this mesh has '
                     f'{devices} devices (use stacked or auto).')
  if layout == 'auto':
    return 'per_block' if devices == 1 and jax.default_backend() == 'cpu' else 'stacked'
  return layout


def one_device_mesh():
  """The mesh of this process's first device (what --weight_layout=per_block decodes on)."""
  return sharding.make_mesh(1, devices=jax.local_devices()[:1])


def decoding_params(params, layout: str, mesh, orientation: str = 'rows'):
  """The target's parameters as the decoding program reads them.

  layout: 'stacked' (as stored: leaves [L, ...] sliced by the layer scan), 'per_block'
  (models.transformer.decoding_layout: each block's fused q/k/v, gate/up and down in
  its own buffer; measured on SmolLM2 at batch 1 on a 2-core CPU, an AR step 20 -> 16 ms
  in float32, 11.9 -> 11.1 ms on the kept Q4_1 file, the same tokens), or 'auto' =
  per_block when decoding on one CPU device (the mesh's size), else stacked
  (on a mesh the stacked parameters are sharded by their logical axes; accelerators
  were not measured). orientation: the layout's (models.transformer.ORIENTATIONS):
  'rows' when every product has one row (batch 1 and a method whose target calls carry
  one token: registry one_token_calls), 'columns' otherwise (SmolLM2 f32, context 256,
  one call: batch 1 and 2 / 4 / 8 tokens 27 / 29 / 32 ms in rows, 22 / 24 / 27 in
  columns; one token at batch 1 16.0 vs 16.8 ms, at batch 2 27.8 vs 22.2, at batch 8 35
  vs 30).
  The layout of a parameter tree is made once per orientation and kept for the last
  tree asked (a bench decodes one model many times): a second copy of the block
  weights per orientation used while that model lives. Raises ValueError for an unknown
  layout or orientation, or per_block on a mesh of several devices. Returns None when
  the stacked parameters are to be placed as they are (the caller's mesh placement)."""
  if effective_layout(layout, mesh.size) == 'stacked':
    return None
  from models import transformer
  if orientation not in transformer.ORIENTATIONS:
    raise ValueError(f'orientation={orientation!r}; expected one of '
                     f'{", ".join(transformer.ORIENTATIONS)}.')
  if any(p is not params or m != mesh for p, m, _ in _LAYOUT_CACHE.values()):
    _LAYOUT_CACHE.clear()
  if orientation not in _LAYOUT_CACHE:
    on_mesh = sharding.replicated(mesh)   # the one device it decodes on, as a mesh
    laid_out = transformer.decoding_layout(jax.device_put(params, on_mesh), orientation)
    _LAYOUT_CACHE[orientation] = (params, mesh, jax.device_put(laid_out, on_mesh))
  return _LAYOUT_CACHE[orientation][2]


def default_mesh_layout(layout: str) -> str:
  """effective_layout for a decode on the mesh decode_tokens picks without mesh options:
  every device, or one for per_block (which decodes on one device). Raises ValueError
  for an unknown layout."""
  return effective_layout(layout, 1 if layout == 'per_block' else jax.device_count())


def measured_params(params, layout: str, orientation: str = 'rows'):
  """The parameters a measurement outside decode_tokens (the verify-cost curve,
  launch.trunk_cost) times: in the layout (and orientation, for per_block) a decode with
  the default mesh would read (default_mesh_layout), on one device."""
  if default_mesh_layout(layout) == 'per_block':
    return decoding_params(params, 'per_block', one_device_mesh(), orientation)
  return jax.device_put(params)


def _place(tree, shardings):
  """jax.device_put onto a mesh; in a multi-process run from host copies (arrays on one
  local device cannot move to other processes' devices; every process holds the same
  values, so each places its own shards)."""
  if jax.process_count() > 1:
    tree = jax.device_get(tree)
  return jax.device_put(tree, shardings)


def _on_every_host(tree):
  """`tree`'s arrays as host values in every process: a multi-process run's outputs are
  global arrays of which a process holds only its rows; process_allgather gives each
  process the whole (single-process: unchanged)."""
  if all(getattr(x, 'is_fully_addressable', True) for x in jax.tree.leaves(tree)):
    return tree
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


# Prompt arrays are padded to a multiple of this many tokens (or the longest prompt's
# length): one compiled program per width.
PROMPT_WIDTH_MULTIPLE = 256


def prompt_width(longest_in_batch: int, longest: int) -> int:
  """The padded width of a batch whose longest prompt has `longest_in_batch` tokens, when
  the longest of all prompts has `longest`: rounded up to PROMPT_WIDTH_MULTIPLE, at most
  `longest`. The prefill computes every padded position, so padding a 269-token prompt to
  a 1209-token neighbour's width made its prefill (time to first token) cost the
  neighbour's; the rounding bounds how many programs a run compiles."""
  return min(-(-longest_in_batch // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE, longest)


def decode_tokens(restored, prompts: list[list[int]], method: str, options: DecodeOptions,
                  draft=None, repeats: int = 1,
                  time_prefill: bool = False,
                  warmup: bool = False) -> tuple[list[list[int]], dict]:
  """Decodes token prompts in batches, each padded to its own width (prompt_width: one
  compilation per width, excluded from wall_s; compile_s is the longest one, programs
  their number). With repeats > 1 each batch runs that many times and the median counts;
  warmup: one more untimed run of each program first (benchmarks).

  restored / draft: checkpoints.RestoredModel of the target and of the method's second
  model (a draft, heads), or None. Returns (new tokens per prompt, stats); stats'
  finish_reasons holds, per prompt, why it ended (driver.Output.finish_reasons).

  time_prefill: also time the prefill alone (time to first token), so that latency reads
  as users read it: stats gain prefill_s (seconds, summed over batches like wall_s),
  prefill_ms (per batch call: the time to first token), decode_s (the full run less its
  prefill, paired run by run: timing.paired_seconds),
  decode_tokens (new tokens after each row's first) and decode_tokens_per_s. The prefill
  program is `driver.generate` itself with max_new_tokens = 1 on the same shapes (same
  cache capacity, same prompts): the prefill call, the first token and the proposer's
  start, after which every row is done and the loop runs no round. It is the same code as
  the front of the full program, not a copy of it, at the price of a second compilation
  (prefill_compile_s, not in compile_s).
  Raises ValueError for an unknown method, bad options or prompts, a missing or wrong
  second model.
  """
  registry.load_plugins(options.plugins)
  entry = registry.get(method)
  options.sampling()  # Validates the sampling settings before any work.
  if options.batch_size < 0:
    raise ValueError(f'--batch_size={options.batch_size}; expected >= 1, or 0 for all the '
                     'prompts (at most 8) per call.')
  if options.prefill_chunk < 0:
    raise ValueError(f'--prefill_chunk={options.prefill_chunk}; expected >= 1 prompt tokens '
                     'per prefill call, or 0 for one call.')
  if not -2**63 <= options.seed < 2**63:
    raise ValueError(f'--seed={options.seed}; expected a 64-bit integer '
                     '(-2**63 <= seed < 2**63).')
  from launch import autotune
  if autotune.wants_auto(entry, options):
    check_draft(restored, draft)
    run, options, auto = autotune.resolve(restored, prompts, method, options, draft)
    completions, stats = decode_tokens(restored, prompts, run, options,
                                       None if run == 'autoregressive' else draft, repeats,
                                       time_prefill, warmup)
    stats['auto'] = dict(auto, method=run)   # the method that ran: `method`, or AR
    return completions, stats
  check_draft(restored, draft)
  tokenizer, model = restored.tokenizer, restored.model
  longest = max(len(p) for p in prompts)
  padded, lengths = driver.pad_prompts(prompts, tokenizer.pad_id)
  if options.infill:  # Templates: their spans are the new tokens.
    _check_infill(restored, method)
    from decoding import any_subset
    any_subset.check_templates(padded, lengths, model.mask_id, options.max_context)
    capacity = longest
  else:
    driver.check_prompts(padded, lengths, capacity=options.max_context,
                         vocab_size=getattr(model, 'mask_id', model.config.vocab_size),
                         max_new_tokens=options.max_new_tokens)
    # The cache holds what the longest prompt needs, within the context limit.
    capacity = min(options.max_context, longest + options.max_new_tokens)
  config, drafter, params = _build(restored, entry, options, capacity, draft)

  # Over every process's devices: a multi-process run decodes each batch as one global
  # program (each process holds its rows' shards), and every process gets all outputs.
  if options.weight_layout == 'per_block':   # the decoding layout runs on one device
    if options.model_parallelism > 1 or options.mesh_shape or jax.process_count() > 1:
      raise ValueError('--weight_layout=per_block decodes on one device; it cannot be '
                       'combined with --model_parallelism, --mesh_shape or several processes.')
    mesh = one_device_mesh()
  else:
    mesh = sharding.make_mesh(options.model_parallelism, shape=options.mesh_shape)
  data_size = sharding.data_parallel_size(mesh)
  batch = options.batch_size or min(len(prompts), 8)
  batch = -(-batch // data_size) * data_size  # Whole rows per data shard.
  orientation = decode_orientation(params, batch, entry.one_token_calls)
  laid_out = decoding_params(params, options.weight_layout, mesh, orientation)
  params = (_place(params, sharding.param_shardings(model, mesh, params=params))
            if laid_out is None else laid_out)
  drafter_params = drafter.params
  if drafter_params is not None:
    drafter_params = _place(drafter_params, sharding.param_shardings(
        drafter.module, mesh, params=drafter_params))
  rows, row_lengths = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  completions, stats = [], dict(new_tokens=0, target_calls=0, wall_s=0.0, compile_s=0.0,
                                weight_layout='stacked' if laid_out is None else 'per_block')
  if laid_out is not None:
    stats['weight_orientation'] = orientation
  first_token = dataclasses.replace(config, max_new_tokens=1) if time_prefill else None
  if time_prefill:
    stats.update(prefill_s=0.0, prefill_compile_s=0.0, decode_s=0.0)
  if getattr(config, 'tree', None) is not None:
    stats['tree'] = str(config.tree)
  histogram, draft_calls, programs, finishes, ranks = None, 0, {}, [], None
  exits = exit_blocks = exit_steps = None
  batches = []   # (rows, rows padded to the batch size with copies, prompt width)
  for start in range(0, len(prompts), batch):
    chunk = list(range(start, min(start + batch, len(prompts))))
    fill = chunk + [chunk[0]] * (batch - len(chunk))
    batches.append((chunk, fill, padded.shape[1] if options.infill
                    else prompt_width(int(lengths[fill].max()), padded.shape[1])))
  # A width's programs are dropped after its last batch: XLA:CPU keeps each compiled
  # program's code mapped while it lives (see launch/benchmarking.py).
  last_use = {width: i for i, (_, _, width) in enumerate(batches)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    for index, (chunk, fill, width) in enumerate(batches):
      start = chunk[0]
      dynamic = dict(params=params, prompts=jax.device_put(padded[fill, :width], rows),
                     prompt_lengths=jax.device_put(lengths[fill], row_lengths),
                     rng=_place(jax.random.fold_in(jax.random.PRNGKey(options.seed), start),
                                sharding.replicated(mesh)),
                     drafter_params=drafter_params)
      if width not in programs:  # One compilation per prompt width (prompt_width).
        t0 = time.perf_counter()
        compiled = driver.generate.lower(model=model, config=config, drafter=drafter.module,
                                         **dynamic).compile()
        stats['compile_s'] = max(stats['compile_s'], time.perf_counter() - t0)
        prefill_only = None
        if time_prefill:
          t0 = time.perf_counter()
          prefill_only = driver.generate.lower(model=model, config=first_token,
                                               drafter=drafter.module, **dynamic).compile()
          stats['prefill_compile_s'] = max(stats['prefill_compile_s'],
                                           time.perf_counter() - t0)
        programs[width] = compiled, prefill_only
      compiled, prefill_only = programs[width]
      if last_use[width] == index:
        del programs[width]
      if time_prefill:
        seconds, prefill, decode, out = timing.paired_seconds(
            lambda: jax.block_until_ready(compiled(**dynamic)),
            lambda: jax.block_until_ready(prefill_only(**dynamic)), repeats, warmup)
        stats['prefill_s'] += prefill
        stats['decode_s'] += decode
      else:
        seconds, out = timing.median_seconds(
            lambda: jax.block_until_ready(compiled(**dynamic)), repeats, warmup)
      out = _on_every_host(out)
      stats['wall_s'] += seconds
      new = out.completions()[:len(chunk)]
      completions += new
      finishes += out.finish_reasons()[:len(chunk)]
      stats['new_tokens'] += sum(len(c) for c in new)
      stats['target_calls'] += int(out.target_calls)
      # The prefill's forward calls (chunked: one per chunk; target_calls counts it once).
      stats['prefill_calls'] = stats.get('prefill_calls', 0) + int(
          out.stats.get('prefill_calls', 1))
      if 'nfe' in out.stats:  # block diffusion, any-subset: model calls per row
        stats['nfe'] = stats.get('nfe', 0) + int(np.asarray(out.stats['nfe'])[:len(chunk)].sum())
      if 'exit_histogram' in out.stats:  # early exit: row-tokens per exit, blocks run
        h = np.asarray(out.stats['exit_histogram'])
        exits = h if exits is None else exits + h
        exit_blocks = (exit_blocks or 0) + int(out.stats['blocks_run'])
        exit_steps = (exit_steps or 0) + int(out.stats['steps'])
      if 'accepted_histogram' in out.stats:
        h = np.asarray(out.stats['accepted_histogram'])
        histogram = h if histogram is None else histogram + h
        draft_calls += int(out.stats['draft_calls'])
      if 'accepted_rank_histogram' in out.stats:  # dynamic trees: accepted nodes by rank
        h = np.asarray(out.stats['accepted_rank_histogram'])
        ranks = h if ranks is None else ranks + h
  stats['programs'] = len(last_use)   # one per distinct width
  stats['tokens_per_s'] = stats['new_tokens'] / max(stats['wall_s'], 1e-9)
  if time_prefill:
    calls = -(-len(prompts) // batch)
    stats['prefill_ms'] = 1e3 * stats['prefill_s'] / calls
    # The prefill program's time is part of the full program's; what is left is the
    # rounds (the median of paired differences, timing.paired_seconds). Noise can make it tiny
    # on very short runs: floored, never negative.
    stats['decode_s'] = max(stats['decode_s'], 1e-9)
    stats['decode_tokens'] = stats['new_tokens'] - len(prompts)
    stats['decode_tokens_per_s'] = stats['decode_tokens'] / stats['decode_s']
  # Per prompt: {'reason': 'stop', 'stop_id': id} | {'reason': 'length'} | {'reason': 'context'}.
  stats['finish_reasons'] = finishes
  stats['lossless'] = entry.lossless(config)
  if exits is not None:
    layers = np.asarray(config.exit_layers + (model.config.num_layers,))
    stats.update(exit_layers=layers.tolist(), exit_histogram=exits.tolist(),
                 threshold=config.threshold, confidence=config.confidence,
                 # blocks per token each row needed, and per step the batch ran
                 mean_exit_layer=float((exits * layers).sum() / max(exits.sum(), 1)),
                 blocks_per_step=exit_blocks / max(exit_steps, 1))
  if histogram is not None:
    stats.update(mean_accepted=driver.mean_accepted(histogram), draft_calls=draft_calls,
                 accepted_histogram=histogram.tolist())
  if ranks is not None:
    stats['accepted_rank_histogram'] = ranks.tolist()
  return completions, stats
