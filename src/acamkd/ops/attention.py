"""Single-head cross-attention with narrow q/k and wide v, through fused SDPA kernels.

STCA-FF (spec section 1) attends with q/k of width ``C_q = C // 2`` and v of width ``C``,
one head, scale ``1/sqrt(C_q)``. A materialised ``(HW, HW)`` attention matrix costs
17 GiB per image on Faster R-CNN's P2 level, so this module routes the math through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN on
GPU, the blockwise flash kernel on CPU), which never materialises it.

Fused kernels want one head dim shared by q, k and v, a multiple of 8. The layout that gets
there without changing the math (:class:`AttentionLayout`):

* ``C == 2 * C_q`` (every even C): v is split into ``heads = 2`` heads of ``C_q`` channels
  that share the same q and k. Each head's softmax is the same single-head softmax, so the
  concatenated outputs are exactly ``softmax(q k^T * scale) v``.
* otherwise (odd C, e.g. the 19 Cityscapes logits, ``C_q = 9``): one head.

Then q, k and every v head are zero-padded to ``head_dim`` (a multiple of 8). Zero channels
add nothing to a dot product, and padded v channels are sliced off the output. The padding
is done on the projection *weights* (zero rows), so the padded q/k/v come straight out of
one matmul each, already in the ``(B, N, ...)`` channels-last layout the kernels read; no
layout copies of the activations are made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionLayout", "cross_attention_tokens", "project_padded_qkv"]

def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class AttentionLayout:
    """How a ``(C_q, C_v)`` single-head attention is laid out for the fused kernels.

    ``heads`` v heads share q/k; each head carries ``value_per_head`` real channels padded
    to ``head_dim``; q/k carry ``qk_dim`` real channels padded to ``head_dim``.
    """

    qk_dim: int
    value_dim: int
    heads: int
    head_dim: int

    @property
    def value_per_head(self) -> int:
        return self.value_dim // self.heads

    @classmethod
    def for_dims(cls, qk_dim: int, value_dim: int, split_value: bool = True, multiple: int = 8) -> "AttentionLayout":
        """``split_value``: split v into ``value_dim // qk_dim`` heads sharing q/k when it
        divides (head dim stays ``qk_dim``); else one head with q/k padded up to v's width."""
        if qk_dim < 1 or value_dim < 1:
            raise ValueError(f"attention dims must be >= 1, got qk_dim={qk_dim}, value_dim={value_dim}")
        heads = value_dim // qk_dim if split_value and value_dim % qk_dim == 0 else 1
        head_dim = _round_up(max(qk_dim, value_dim // heads), multiple)
        return cls(qk_dim=qk_dim, value_dim=value_dim, heads=heads, head_dim=head_dim)


def _pad_rows(weight: Tensor, bias: Tensor | None, rows: int) -> tuple[Tensor, Tensor | None]:
    """Zero-pad a linear map ``(R, C_in)`` to ``(rows, C_in)`` (bias likewise)."""
    extra = rows - weight.shape[0]
    if extra == 0:
        return weight, bias
    weight = F.pad(weight, (0, 0, 0, extra))
    bias = None if bias is None else F.pad(bias, (0, extra))
    return weight, bias


def _value_rows_per_head(weight: Tensor, bias: Tensor | None, layout: AttentionLayout):
    """Arrange v's ``(C_v, C_in)`` weight into ``heads`` blocks of ``head_dim`` rows."""
    c_in = weight.shape[1]
    per = layout.value_per_head
    w = weight.reshape(layout.heads, per, c_in)
    w = F.pad(w, (0, 0, 0, layout.head_dim - per)).reshape(layout.heads * layout.head_dim, c_in)
    if bias is None:
        return w, None
    b = F.pad(bias.reshape(layout.heads, per), (0, layout.head_dim - per)).reshape(-1)
    return w, b


def project_padded_qkv(
    query_tokens: Tensor,   # (B, N, C)  source of q
    context_tokens: Tensor,  # (B, N, C)  source of k and v
    w_q: Tensor, b_q: Tensor | None,  # (C_q, C), (C_q,)
    w_k: Tensor, b_k: Tensor | None,  # (C_q, C), (C_q,)
    w_v: Tensor, b_v: Tensor | None,  # (C_v, C), (C_v,)
    layout: AttentionLayout,
) -> tuple[Tensor, Tensor, Tensor]:
    """1x1 projections straight into the kernel layout ``(B, heads, N, head_dim)``.

    k and v come out of one matmul (they read the same tokens). q and k are expanded over
    the v heads (stride 0, no copy).
    """
    B, N, _ = query_tokens.shape
    D, H = layout.head_dim, layout.heads
    wq, bq = _pad_rows(w_q, b_q, D)
    wk, bk = _pad_rows(w_k, b_k, D)
    wv, bv = _value_rows_per_head(w_v, b_v, layout)
    w_kv = torch.cat([wk, wv], dim=0)  # (D + H*D, C)
    if bk is None and bv is None:
        b_kv = None
    else:  # one matmul for k and v: a missing bias on either side is a zero bias
        bk = wk.new_zeros(wk.shape[0]) if bk is None else bk
        bv = wv.new_zeros(wv.shape[0]) if bv is None else bv
        b_kv = torch.cat([bk, bv], dim=0)
    q = F.linear(query_tokens, wq, bq)  # (B, N, D)
    kv = F.linear(context_tokens, w_kv, b_kv)  # (B, N, D + H*D)
    k = kv[..., :D]  # (B, N, D)
    v = kv[..., D:].unflatten(-1, (H, D)).transpose(1, 2)  # (B, H, N, D)
    q = q.unsqueeze(1).expand(B, H, N, D)
    k = k.unsqueeze(1).expand(B, H, N, D)
    return q, k, v


def cross_attention_tokens(
    query_tokens: Tensor,
    context_tokens: Tensor,
    w_q: Tensor, b_q: Tensor | None,
    w_k: Tensor, b_k: Tensor | None,
    w_v: Tensor, b_v: Tensor | None,
    split_value_heads: bool = True,
) -> Tensor:
    """``softmax((W_q x_q)(W_k x_c)^T / sqrt(C_q)) (W_v x_c)`` on ``(B, N, C)`` tokens.

    Returns ``(B, N, C_v)``. Exact (up to float rounding) single-head attention with no
    ``(N, N)`` matrix in memory: because q, k and v share one head dim, the kernels that tile
    apply (flash / memory-efficient / cuDNN on GPU; on CPU the blockwise flash kernel, for
    fp64, fp32, fp16 and bf16 alike, forward and backward: a test checks it is the one run).

    ``split_value_heads`` picks the :class:`AttentionLayout`: split v into heads that share
    q/k (head dim ``C_q``, e.g. 2 x 128 for C=256) or one head with q/k zero-padded to v's
    width (1 x 256). Same FLOPs, same values. Split is the default: flash kernels are tuned
    for head dim 128; on CPU the two measured within 6% of each other (docs/performance.md).
    """
    qk_dim, v_dim = w_q.shape[0], w_v.shape[0]
    layout = AttentionLayout.for_dims(qk_dim, v_dim, split_value=split_value_heads)
    q, k, v = project_padded_qkv(query_tokens, context_tokens, w_q, b_q, w_k, b_k, w_v, b_v, layout)
    scale = 1.0 / math.sqrt(qk_dim)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, D)
    # Kernels return (B, H, N, D) as a transposed view of (B, N, H, D): this is a free view.
    out = out.transpose(1, 2)[..., : layout.value_per_head]  # (B, N, H, Cv/H)
    return out.reshape(out.shape[0], out.shape[1], v_dim)  # (B, N, C_v)
