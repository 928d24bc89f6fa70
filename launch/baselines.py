"""Other engines on the same weights, in the same run as ours (launch.bench, launch.compare_hf):

  transformers `generate` on the workdir exported to the Hugging Face layout: greedy, and
    with `prompt_lookup_num_tokens` (its prompt-lookup drafting, Saxena 2023);
  llama.cpp (the `llama-cpp-python` package) on an f32 GGUF export of the workdir: greedy,
    and with its prompt-lookup drafting (llama_speculative.LlamaPromptLookupDecoding).

Each engine reports what ours reports (training-free rows of the bench table): new tokens,
wall seconds, and the split of latency into prefill (time to first token) and decoding.
An engine that is not installed is skipped with a one-line reason (`unavailable`), never
installed from here: llama-cpp-python builds from source for minutes.
"""
import importlib.util
import os
import statistics
import time

from launch import timing

ENGINES = ('transformers', 'llama.cpp')
_PACKAGES = {'transformers': ('transformers', 'torch'), 'llama.cpp': ('llama_cpp',)}


def unavailable(engine: str) -> str | None:
  """None when `engine` (one of ENGINES) can run here, else why not (one line)."""
  missing = [p for p in _PACKAGES[engine] if importlib.util.find_spec(p) is None]
  if missing:
    install = {'transformers': 'pip install -e .[hf]', 'llama.cpp': 'pip install llama-cpp-python'}
    return f'{", ".join(missing)} not installed ({install[engine]})'
  return None


def cut_at_stop(ids: list[int], eos_ids) -> list[int]:
  """The tokens up to and including the first stop id (our completions' convention)."""
  stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
  return ids if stop is None else ids[:stop + 1]


def latency_stats(new_tokens: int, wall_s: float, prefill_s: float, calls: int,
                  num_prompts: int, decode_s: float | None = None) -> dict:
  """The latency fields every bench row carries (launch.generation.decode_tokens' names):
  seconds summed over `calls` batch calls; the first token of each prompt is the prefill's.
  decode_s: the decode time measured run by run (the median of each run's total less its
  own prefill, as our rows take it); default wall_s - prefill_s."""
  decode_s = max(wall_s - prefill_s if decode_s is None else decode_s, 1e-9)
  return dict(new_tokens=new_tokens, wall_s=wall_s, tokens_per_s=new_tokens / max(wall_s, 1e-9),
              prefill_s=prefill_s, prefill_ms=1e3 * prefill_s / max(calls, 1),
              decode_s=decode_s, decode_tokens=new_tokens - num_prompts,
              decode_tokens_per_s=(new_tokens - num_prompts) / decode_s)


def load_transformers(restored, directory: str):
  """The workdir's model exported to `directory` (Hugging Face layout) and loaded by
  transformers in float32: the same weights our decoders read. On the kind of device ours
  decode on: a CUDA GPU when JAX's backend is 'gpu' and torch sees one, else the CPU."""
  import jax
  import torch
  import transformers
  from launch import conversion
  conversion.export_hf(restored.workdir, directory)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  if jax.default_backend() == 'gpu' and torch.cuda.is_available():
    model = model.to('cuda')
  return model.eval()


def hf_generate(model, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                eos_ids, pad_id: int, repeats: int = 1, assistant=None,
                prompt_lookup: int = 0, time_prefill: bool = False):
  """transformers greedy `generate` over token prompts in batches (ragged prompts are
  left-padded with an attention mask, as transformers expects for decoder-only models).

  After one untimed warm-up per batch, the median of `repeats` runs counts. prompt_lookup
  K > 0: `prompt_lookup_num_tokens=K`; assistant: an assistant model (assisted generation);
  both draft for one row only, so they need batch_size 1. time_prefill: also time
  `generate(max_new_tokens=1)` on the same batch (prefill and the first token).
  Returns (completions cut after the first stop id, latency_stats(...) or {'wall_s'}).
  Raises ValueError for drafting at batch_size > 1.
  """
  import torch
  if (assistant is not None or prompt_lookup) and batch_size != 1:
    raise ValueError('transformers drafts (assisted generation, prompt lookup) for batch '
                     f'size 1 only, not {batch_size}.')
  eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
  wall = prefill = decode = 0.0
  completions, calls = [], 0
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    width = max(map(len, chunk))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk],
                       device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                        device=model.device)
    kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=eos_ids,
                  pad_token_id=pad_id)
    if assistant is not None:
      kwargs['assistant_model'] = assistant
    if prompt_lookup:
      kwargs['prompt_lookup_num_tokens'] = prompt_lookup
    with torch.no_grad():
      # .cpu() waits for the device: the timers need the run finished when it returns.
      run = lambda n: model.generate(ids, max_new_tokens=n, **kwargs).cpu()
      run(max_new_tokens)  # warm-up
      if time_prefill:   # each run paired with a prefill-only run, as ours
        seconds, first, rest, out = timing.paired_seconds(
            lambda: run(max_new_tokens), lambda: run(1), repeats)
        prefill += first
        decode += rest
      else:
        seconds, out = timing.median_seconds(lambda: run(max_new_tokens), repeats)
      wall += seconds
    calls += 1
    completions += [cut_at_stop(row, eos_ids) for row in out[:, width:].tolist()]
  new_tokens = sum(map(len, completions))
  if not time_prefill:
    return completions, dict(new_tokens=new_tokens, wall_s=wall)
  return completions, latency_stats(new_tokens, wall, prefill, calls, len(prompts), decode)


class LlamaCpp:
  """llama.cpp through llama-cpp-python, one sequence at a time (its high-level API decodes
  one row): on an f32 GGUF export of a workdir (the same weights as ours), or, with
  `gguf`, on that GGUF file itself (a path or a named model such as smollm2-135m: the
  file a `--keep_quantized` import decodes, so both engines run the same 4-bit blocks).
  `weights` names which ('f32 export' or the file's name).

  kv_cache: the element type of llama.cpp's KV cache, 'f16' (llama.cpp's default: it
  reads half the attention bytes of ours) or 'f32' (the numerics of our float32 cache).
  Raises ValueError for another name."""

  # Context slots beyond prompt + new tokens: llama-cpp-python writes a round's drafted
  # tokens past the last committed one and fails when they do not fit.
  DRAFT_ROOM = 64

  KV_CACHE_TYPES = ('f16', 'f32')

  def __init__(self, restored, path: str, context: int, gguf: str = '', kv_cache: str = 'f16'):
    if kv_cache not in self.KV_CACHE_TYPES:
      raise ValueError(f'llama.cpp KV cache type {kv_cache!r} is not one of '
                       f'{", ".join(self.KV_CACHE_TYPES)}.')
    self.kv_cache = kv_cache
    if gguf:
      from training import gguf_io
      path = gguf_io.resolve(gguf)
      self.weights = os.path.basename(path)
    else:
      from launch import conversion
      conversion.export_gguf(restored.workdir, path, 'f32')
      self.weights = 'f32 export'
    self.path, self.context = path, context + self.DRAFT_ROOM
    self.llm = self._load(logits_all=False)
    self.lookup_llm = None   # loaded on first use: prompt lookup needs every position's logits

  def _load(self, logits_all: bool):
    import llama_cpp
    kv = {'f16': llama_cpp.GGML_TYPE_F16, 'f32': llama_cpp.GGML_TYPE_F32}[self.kv_cache]
    return llama_cpp.Llama(model_path=self.path, n_ctx=self.context,
                           n_batch=min(self.context, 2048), n_threads=os.cpu_count(),
                           logits_all=logits_all, type_k=kv, type_v=kv, verbose=False)

  def close(self) -> None:
    """Frees the model now (llama-cpp-python's finalizer fails at interpreter exit)."""
    for llm in (self.llm, self.lookup_llm):
      if llm is not None:
        llm.close()

  def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids,
               prompt_lookup: int = 0, repeats: int = 1):
    """Greedy (temp 0, no repetition penalty) decoding of each prompt; prompt_lookup K > 0
    drafts with LlamaPromptLookupDecoding(num_pred_tokens=K) (max n-gram 2, as
    transformers' default). Time to first token is read when the first token arrives.
    Returns (completions, latency_stats(...))."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    llm = self.llm
    if prompt_lookup:
      # llama-cpp-python verifies drafts from every position's logits: without
      # logits_all its sampler asserts (GGML_ASSERT(logits != nullptr)) and aborts.
      self.lookup_llm = self.lookup_llm or self._load(logits_all=True)
      llm = self.lookup_llm
      llm.draft_model = LlamaPromptLookupDecoding(max_ngram_size=2,
                                                  num_pred_tokens=prompt_lookup)
    eos_ids = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)

    def once(prompt):
      out, first = [], None
      llm.reset()   # else generate() reuses the previous run's prompt keys/values (no prefill)
      t0 = time.perf_counter()
      for token in llm.generate(list(prompt), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                repeat_penalty=1.0, reset=True):
        first = time.perf_counter() - t0 if first is None else first
        out.append(int(token))
        if token in eos_ids or len(out) >= max_new_tokens:
          break
      return time.perf_counter() - t0, first, out

    wall = prefill = decode = 0.0
    completions = []
    for prompt in prompts:
      once(prompt)  # warm-up
      runs = [once(prompt) for _ in range(max(repeats, 1))]
      wall += statistics.median(r[0] for r in runs)
      prefill += statistics.median(r[1] for r in runs)
      decode += statistics.median(r[0] - r[1] for r in runs)
      completions.append(runs[-1][2])
    new_tokens = sum(map(len, completions))
    return completions, latency_stats(new_tokens, wall, prefill, len(prompts), len(prompts),
                                      decode)
