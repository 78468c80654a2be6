"""Fast kernels behind small functions; each has a plain reference it is tested against."""
from acamkd.ops.attention import AttentionLayout, cross_attention_tokens
from acamkd.ops.masking import (
    CHANNEL_MASK_FORMS,
    MASK_ACTIVATIONS,
    MASK_NORMS,
    channel_mask_logits,
    channel_masks,
    error_correlation,
    mask_masses,
    mass_floor,
    masked_mse,
    mean_pairwise_dice,
    pairwise_dice,
    participation_ratio,
    partition_gain,
    reverse_gradient,
    spatial_masks,
)

__all__ = [
    "AttentionLayout",
    "cross_attention_tokens",
    "CHANNEL_MASK_FORMS",
    "MASK_ACTIVATIONS",
    "MASK_NORMS",
    "channel_mask_logits",
    "channel_masks",
    "spatial_masks",
    "masked_mse",
    "partition_gain",
    "mass_floor",
    "reverse_gradient",
    "pairwise_dice",
    "mean_pairwise_dice",
    "mask_masses",
    "participation_ratio",
    "error_correlation",
]
