"""Shared pieces of every training config: argument parsing, model sizes, defaults."""
import ml_collections

# Trunk sizes shared by all families. Parameter counts exclude embeddings.
MODEL_SIZES = {
    # ~0.1M params: unit tests and smoke runs.
    'tiny': dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192),
    # ~3.2M params: the quickstart target on 2 CPU cores.
    'small': dict(num_layers=4, d_model=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=704),
    # ~60M params: for an accelerator.
    'base': dict(num_layers=12, d_model=640, num_heads=10, num_kv_heads=5, head_dim=64,
                 mlp_dim=1728),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' (the part after ':' in --config=FILE:ARG).

  Values are typed by the default's type; unknown keys are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'Unknown config argument {item!r}; known: '
                       + ', '.join(f'{k}={v}' for k, v in defaults.items()))
    kind = type(defaults[key])
    out[key] = (value.lower() in ('1', 'true', 'yes')) if kind is bool else kind(value)
  return out


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` block: trunk shape (models.TransformerConfig fields but vocab_size)."""
  if size not in MODEL_SIZES:
    raise ValueError(f'Unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}.')
  model = dict(
      rope_theta=10_000.0,     # rotary base
      tie_embeddings=False,    # share the input embedding with the LM head
      qkv_bias=False,          # bias on q/k/v projections (Qwen-style)
      dtype='float32',         # activations: float32 | bfloat16
      param_dtype='float32',   # stored parameters
      mtp_heads=1,             # output heads, head i predicting token t + i (configs/mtp.py)
  )
  model.update(MODEL_SIZES[size])
  model.update(overrides)  # e.g. a draft's smaller trunk
  return ml_collections.ConfigDict(model)


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source='stdlib',          # stdlib | files:GLOB | tfds:NAME
      text_key='text',          # text feature of a tfds: source
      data_dir='',              # where TFDS keeps prepared data ('' = ~/tensorflow_datasets)
      stdlib_root='',           # stdlib folder to read ('' = this interpreter's)
      include_tests=False,      # keep the stdlib's test folders in the corpus
      validation_permille=50,   # files per thousand (by path hash) in the validation split
      train_split='train',
      validation_split='validation',
      rows_shuffle_window=64,   # packed rows shuffled within windows of this many
      num_shards=0,             # independent pipelines forming the global batch (each over
                                # every num_shards-th document); a process reads its own
                                # shards. 0 = one per process. Same value = same batches,
                                # whatever the process count (training/data.py)
  ))


def train_config() -> ml_collections.ConfigDict:
  """Top-level fields every training config has, whatever its family."""
  config = ml_collections.ConfigDict()
  config.family = 'ar_lm'             # models/families.py, training/objectives/
  config.seed = 0                     # init, data order and step rngs
  config.num_train_steps = 2000       # optimizer steps in total (raise it to continue a run)
  config.batch_size = 16              # sequences per step, over all devices
  config.seq_len = 256                # tokens per sequence
  config.eval_every_steps = 500       # validation loss / perplexity / bits per byte
  config.eval_batches = 16            # validation batches per evaluation
  config.checkpoint_every_steps = 500 # also saved at the end
  config.keep_checkpoints = 3         # most recent checkpoints kept
  config.log_every_steps = 20         # progress bar and TensorBoard scalars
  config.learning_rate = 3e-3         # peak, after linear warmup
  config.warmup_steps = 100
  config.final_lr_fraction = 0.1      # cosine decays to this fraction of the peak
  config.weight_decay = 0.1           # AdamW, on matrices only
  config.adam_b1 = 0.9
  config.adam_b2 = 0.95
  config.grad_clip_norm = 1.0         # global-norm clipping
  config.model_parallelism = 1        # size of the mesh's `model` axis
  config.mesh = ml_collections.ConfigDict(dict(
      shape='',                       # e.g. 'fsdp=8', 'data=2,fsdp=4', 'data=-1,model=2'
  ))                                  # (models/sharding.py); '' = data x model_parallelism
  config.init_from = ''               # workdir (e.g. launch.convert --from_hf) whose params
                                      # and tokenizer start a fresh run; '' = random init
  config.tokenizer = ml_collections.ConfigDict(dict(
      kind='byte',                    # byte | bpe (SentencePiece, trained on the train split)
      vocab_size=2048,                # bpe only
  ))
  config.data = data_config()
  return config
