"""Pure Flax models. Imports nothing from training/ or decoding/."""
from models import masks
from models.kv_cache import KVCache
from models.transformer import ForwardOutput, Transformer, TransformerConfig
from models.heads import EagleDrafter, MedusaHeads
from models.block_diffusion import BlockDiffusionLM, TidarLM
from models.any_subset import AnySubsetLM
from models.parallel_drafter import ParallelDrafter
