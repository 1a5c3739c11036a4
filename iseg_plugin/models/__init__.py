"""Float Segmenter modules (FX-traceable drop-ins for mmseg's) and checkpoint conversion."""
from .checkpoint import CheckpointMismatchError, resize_pos_embed
from .head import ISegmenterMaskHead, PooledLinearHead
from .vit import Attention, IVisionTransformer, Mlp, PatchEmbed, TransformerBlock

__all__ = [
    "CheckpointMismatchError",
    "resize_pos_embed",
    "ISegmenterMaskHead",
    "PooledLinearHead",
    "IVisionTransformer",
    "Attention",
    "Mlp",
    "PatchEmbed",
    "TransformerBlock",
]
