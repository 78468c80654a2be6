"""Fast kernels behind small functions; each has a plain reference it is tested against."""
from acamkd.ops.attention import AttentionLayout, cross_attention_tokens
from acamkd.ops.masking import (
    CHANNEL_MASK_FORMS,
    MASK_NORMS,
    channel_masks,
    masked_mse,
    mean_pairwise_dice,
    pairwise_dice,
    spatial_masks,
)

__all__ = [
    "AttentionLayout",
    "cross_attention_tokens",
    "CHANNEL_MASK_FORMS",
    "MASK_NORMS",
    "channel_masks",
    "spatial_masks",
    "masked_mse",
    "pairwise_dice",
    "mean_pairwise_dice",
]
