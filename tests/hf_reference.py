"""The transformers side of comparisons: our logits on a restored model and transformers'
greedy `generate`, shared by the Hugging Face, GGUF and rotary-scaling tests."""
import jax.numpy as jnp
import numpy as np


def our_logits(restored, ids) -> np.ndarray:
  """[B, T, vocab] float32 logits of a restored model on token ids [B, T] (no cache)."""
  ids = np.asarray(ids)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  out = restored.model.apply({'params': restored.params}, jnp.asarray(ids), positions)
  return np.asarray(out.logits[..., :restored.model.config.vocab_size])


def reference_greedy(model, prompts, max_new: int, eos_ids, before_each=None) -> list:
  """transformers' greedy `generate`, one prompt at a time, cut after the first stop id.
  eos_ids: an id or a sequence of ids; before_each(model): called before each prompt."""
  import torch
  eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
  out = []
  for prompt in prompts:
    if before_each is not None:
      before_each(model)
    with torch.no_grad():
      ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
          1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=max_new,
                           eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    ids = ids[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    out.append(ids if stop is None else ids[:stop + 1])
  return out
