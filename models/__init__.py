"""Pure Flax models. Imports nothing from training/ or decoding/."""
from models import masks
from models.transformer import ForwardOutput, KVCache, Transformer, TransformerConfig
from models.heads import EagleDrafter, MedusaHeads
