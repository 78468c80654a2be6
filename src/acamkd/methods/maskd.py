"""MasKD: masked distillation with receptive tokens (Huang et al., ICLR 2023, "Masked Distillation
with Receptive Tokens"), stage 2 (distillation), following the authors' code ``hunto/MasKD`` @
b5af34f: ``mmrazor/mmrazor/models/losses/maskd.py`` (``MaskModule``, ``MasKDLoss``, ``dice_coeff``),
``mmrazor/configs/distill/maskd/*.py`` (detection), ``segmentation/losses/maskd.py`` and
``segmentation/train_maskd.py`` (segmentation). Stage 1 (learning the tokens on the frozen teacher)
is :mod:`acamkd.engine.maskd_tokens` (``acamkd maskd-tokens CONFIG``); it trains the same
:class:`ReceptiveTokens` modules defined here and writes them to a file this method loads.

Per tapped level, with ``F_T`` the teacher feature ``(N, C, H, W)``, ``M`` receptive tokens
``t_i`` ``(C,)`` and ``F_S' = f(F_S)`` the aligned student (``f`` a trainable 1x1 conv
``C_s -> C_t`` with bias, the authors' ``align_module`` of type ``conv2d``)::

    m_i(F)[p] = sigmoid(t_i . F[:, p])                               (N, M, H, W)  masks
    p(F)      = softmax_M(conv1x1(avgpool(conv3x3(F))))               (N, M)        token weights
    m_i       = m_i(F_T)                     before ``custom_mask_warmup`` optimizer steps
    m_i       = m_i(F_T) * m_i(F_S')         after (the student's masks under no_grad)
    L_i[n, c] = sum_p (m_i (F_S' - F_T))^2 / (sum_p m_i + eps)      (N, M, C)
    L         = w * mean_n sum_i p_i[n] mean_c L_i[n, c]             (weight_mask, detection)
    L         = w * mean_{n, i, c} L_i[n, c]                         (no weight branch, segmentation)

The tokens and the weight branch come from the stage-1 file and stay frozen (``requires_grad``
False: no gradient, no optimizer state; the authors use ``lr_mult=0`` on ``distiller.losses``,
which leaves them unchanged too). No gradient reaches the student through the masks: only
through ``F_S'`` in the masked difference.

The training step: the engine calls :meth:`MasKD.optimizer_stepped` after each optimizer step
(``engine/step.py``), so :attr:`MasKD.step` counts optimizer steps as the authors' ``_iter``
counts iterations; it is saved in the method's state dict (exact resume; the authors' counter
restarts at 0). A user's own loop calls ``optimizer_stepped()`` or :meth:`MasKD.set_step`.

Published constants (:data:`PUBLISHED_CONSTANTS`, ``docs/methods.md`` "MasKD"): the defaults are
the RetinaNet R101 -> R50 config's (M = 6, weight branch on, ``loss_weight`` 7, warm-up 7000).
Where we differ from the authors: the student is resized to the teacher's grid when the grids
differ (they assert equal grids); the math runs in fp32 (fp64 for fp64 inputs) under any autocast;
the masks are computed once per level and the ``(N, M, C, H, W)`` masked features are never
materialised (``sum_p m^2 (s - t)^2`` as one contraction: the same value); the published
configs' head-distillation terms are not part of this method (``docs/methods.md``).
Everything here is training-only: after distillation only the student is kept.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import (
    LevelResult,
    LevelwiseMethod,
    MethodOptions,
    OptionError,
    check_choice,
    check_int,
    check_weight,
    level_key,
    upcast,
)
from acamkd.methods.registry import register

__all__ = [
    "AUTO", "MasKD", "MasKDLevel", "MasKDOptions", "PUBLISHED_CONSTANTS", "ReceptiveTokens", "TOKEN_FILE_FORMAT",
    "dice_coefficient", "load_token_file", "maskd_level_loss", "token_state",
]

AUTO = "auto"
TOKEN_FILE_FORMAT = "acamkd.maskd_tokens/1"
ALIGNS = ("conv", "none")
TOKEN_OPTIMIZERS = ("adam", "sgd")
TOKEN_SCHEDULES = ("cosine", "poly")

#: Constants of the authors' configs (hunto/MasKD @ b5af34f). Stage 2 from
#: ``mmrazor/configs/distill/maskd/``: ``retinanet_r101-retinanet_r50_coco.py`` (loss_weight 7, warm-up
#: 7000), ``retinanet_x101-retinanet_r50_coco.py`` (7, 8500), ``reppoints_x101-reppoints-r50_coco.py``
#: (10, 5000), ``fcos_r101-fcos_r50_coco.py`` (10, 5000), ``fpn_r101-fpn_r50_coco.py`` (Faster R-CNN:
#: 1, 7330), ``cascade_mask_rcnn_x101-fpn_x50_coco.py`` (1, 5000); all M = 6, weight branch on.
#: Stage 1 from ``mmdetection/configs/maskd/*.py``: Adam lr 0.01, weight decay 1e-3, cosine to 1e-6,
#: 2000 iterations (the cascade config: weight decay 0.1; the Faster R-CNN config keeps mmdet's SGD,
#: momentum 0.9, weight decay 1e-4, at lr 0.1). Segmentation (``segmentation/losses/maskd.py``,
#: ``train_maskd.py``, ``train_mask_module.py``): the stride-8 logits, M = 8, no weight branch, no
#: student masks, ``eps`` 1e-5, no align conv, loss ``lambda_kd * 0.5`` with ``lambda_kd`` 1; stage 1
#: SGD lr 0.1, momentum 0.9, weight decay 1e-3, poly 0.9, 10000 iterations.
PUBLISHED_CONSTANTS: dict[str, dict[str, Any]] = {
    "retinanet_r101_r50": {"weight": 7.0, "custom_mask_warmup": 7000},
    "retinanet_x101_r50": {"weight": 7.0, "custom_mask_warmup": 8500},
    "reppoints_x101_r50": {"weight": 10.0, "custom_mask_warmup": 5000},
    "fcos_r101_r50": {"weight": 10.0, "custom_mask_warmup": 5000},
    "fasterrcnn_r101_r50": {"weight": 1.0, "custom_mask_warmup": 7330, "token_optimizer": "sgd",
                            "token_lr": 0.1, "token_weight_decay": 1e-4},
    "cascade_x101_fasterrcnn_x50": {"weight": 1.0, "custom_mask_warmup": 5000, "token_weight_decay": 0.1},
    "segmentation_logits": {"weight": 0.5, "num_tokens": 8, "weight_mask": False, "custom_mask": False,
                            "align": "none", "norm_eps": 1e-5, "token_optimizer": "sgd", "token_lr": 0.1,
                            "token_weight_decay": 1e-3, "token_schedule": "poly", "token_iterations": 10000},
}


@dataclass(kw_only=True)
class MasKDOptions(MethodOptions):
    """Options of ``maskd`` (``method.options`` in a config; plus ``check_finite``). Defaults: the
    authors' RetinaNet R101 -> R50 configs; a segmentation config: their segmentation settings
    (:attr:`task_defaults`); other detectors: :data:`PUBLISHED_CONSTANTS` (e.g.
    ``method.options.weight=10`` for FCOS).

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    num_tokens: int = 6  # M receptive tokens per level (detection configs 6; segmentation 8)
    weight: float = 7.0  # loss_weight: RetinaNet 7, RepPoints 10, FCOS 10, Faster R-CNN 1; seg 0.5
    weight_mask: bool = True  # the token-weight branch p (detection: on; segmentation: off, plain mean)
    custom_mask: bool = True  # after the warm-up multiply the masks by the student's (segmentation: off)
    custom_mask_warmup: int = 7000  # optimizer steps before the student's masks join (RetinaNet R101 7000)
    align: Literal["conv", "none"] = "conv"  # conv: trainable 1x1 C_s -> C_t (detection); none: identity (seg)
    norm_eps: float = 0.0  # added to sum_p m_i (detection code: none; segmentation code: 1e-5)
    token_file: str = AUTO  # stage-1 file (acamkd maskd-tokens CONFIG --out FILE), or auto: learnt in the run folder
    token_iterations: int = 2000  # stage 1: iterations (detection 2000; segmentation 10000)
    token_optimizer: Literal["adam", "sgd"] = "adam"  # stage 1: Adam (detection) | SGD momentum 0.9 (seg, Faster R-CNN)
    token_lr: float = 0.01  # stage 1 learning rate (Adam 0.01; SGD 0.1)
    token_weight_decay: float = 1e-3  # stage 1 weight decay (L2, as torch's Adam/SGD)
    token_schedule: Literal["cosine", "poly"] = "cosine"  # stage 1: cosine to 1e-6 (detection) | poly 0.9 (seg)
    token_checkpoint_every: int = 100  # stage 1: iterations between resumable checkpoints (0: only on a stop signal)
    dice_weight: float = 1.0  # stage 1: weight of the Dice diversity loss (authors: 1, summed over levels)

    #: A segmentation config gets the authors' segmentation settings for every option it leaves unset
    #: (applied by acamkd.config; building the method in Python keeps the detection defaults).
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "segmentation": dict(PUBLISHED_CONSTANTS["segmentation_logits"])}

    def validate(self) -> None:
        super().validate()
        check_int("num_tokens", self.num_tokens, 1)
        check_weight("weight", self.weight)
        for name in ("weight_mask", "custom_mask"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"must be true or false, got {getattr(self, name)!r}")
        check_int("custom_mask_warmup", self.custom_mask_warmup, 0)
        check_choice("align", self.align, ALIGNS)
        check_weight("norm_eps", self.norm_eps)
        if not isinstance(self.token_file, str) or not self.token_file:
            raise OptionError("token_file", f"must be 'auto' or the path of a file written by `acamkd maskd-tokens "
                                            f"CONFIG --out FILE`, got {self.token_file!r}")
        check_int("token_iterations", self.token_iterations, 1)
        check_int("token_checkpoint_every", self.token_checkpoint_every, 0)
        check_choice("token_optimizer", self.token_optimizer, TOKEN_OPTIMIZERS)
        check_weight("token_lr", self.token_lr)
        if self.token_lr <= 0:
            raise OptionError("token_lr", f"must be > 0, got {self.token_lr!r}")
        check_weight("token_weight_decay", self.token_weight_decay)
        check_choice("token_schedule", self.token_schedule, TOKEN_SCHEDULES)
        check_weight("dice_weight", self.dice_weight)


def _cast(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``param`` in the compute dtype (a differentiable cast)."""
    return param if param is None or param.dtype == dtype else param.to(dtype)


# ------------------------------------------------------------------------------ the tokens
class ReceptiveTokens(nn.Module):
    """One level's receptive tokens and token-weight branch (the authors' ``MaskModule``).

    ``tokens`` ``(M, C)``, initialised N(0, 0.01); with ``weight_mask`` the branch ``prob``:
    3x3 conv ``C -> C`` (padding 1), global average pool, 1x1 conv ``C -> M``, each conv
    initialised N(0, sqrt(2 / (k*k*C_out))) with a zero bias (the authors' ``init_weights``).
    Parameter names are ours: ``tokens`` is their ``mask_token``; ``prob`` keeps its name.
    """

    def __init__(self, channels: int, num_tokens: int, weight_mask: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, channels).normal_(0, 0.01))
        self.prob = None
        if weight_mask:
            self.prob = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                      nn.Conv2d(channels, num_tokens, 1))
            for m in self.prob:
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def masks(self, feat: Tensor) -> Tensor:
        """``sigmoid(t_i . F[:, p])``: ``feat`` ``(N, C, H, W)`` -> ``(N, M, H, W)`` in ``feat``'s dtype."""
        return torch.einsum("mc,nchw->nmhw", _cast(self.tokens, feat.dtype), feat).sigmoid()

    def token_weights(self, feat: Tensor) -> Tensor | None:
        """``softmax_M`` of the branch on ``feat`` ``(N, C, H, W)`` -> ``(N, M)``; None without the branch."""
        if self.prob is None:
            return None
        conv3, _, conv1 = self.prob
        dt = feat.dtype
        h = F.conv2d(feat, _cast(conv3.weight, dt), _cast(conv3.bias, dt), padding=1)
        h = F.conv2d(h.mean((2, 3), keepdim=True), _cast(conv1.weight, dt), _cast(conv1.bias, dt))  # (N, M, 1, 1)
        return h.flatten(1).softmax(1)

    def masked_feature(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: ``sum_i p_i m_i * F`` ``(N, C, H, W)`` (``p_i = 1`` without the branch, the
        authors' plain sum) and the Dice coefficient of the masks (0-dim), in ``feat``'s dtype."""
        masks = self.masks(feat)  # (N, M, H, W)
        weights = self.token_weights(feat)
        gate = masks if weights is None else masks * weights[:, :, None, None]
        return feat * gate.sum(1, keepdim=True), dice_coefficient(masks)


def dice_coefficient(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """The authors' ``dice_coeff``: the mean over images and ordered pairs ``i != j`` of
    ``2 <m_i, m_j> / ((|m_i|^2 + eps) + (|m_j|^2 + eps))``; ``masks`` ``(N, M, H, W)`` or
    ``(N, M, HW)``. 0-dim. With one mask (no pair) it is 0."""
    flat = masks.flatten(2)  # (N, M, K)
    M = flat.shape[1]
    if M < 2:
        return flat.sum() * 0.0
    inner = flat @ flat.transpose(1, 2)  # (N, M, M): <m_i, m_j>
    sq = inner.diagonal(dim1=1, dim2=2) + eps  # (N, M): |m_i|^2 + eps
    dice = 2 * inner / (sq[:, :, None] + sq[:, None, :])
    off = ~torch.eye(M, dtype=torch.bool, device=masks.device)
    return dice[:, off].mean()


def token_state(modules: dict[str, ReceptiveTokens]) -> dict[str, Tensor]:
    """``{"<level_key>.<param>": tensor}`` of each level's tokens (and branch), CPU, contiguous:
    what a token file holds."""
    return {f"{level_key(level)}.{k}": v.detach().cpu().contiguous()
            for level, mod in modules.items() for k, v in mod.state_dict().items()}


def load_token_file(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the metadata (``levels``, ``channels``, ``num_tokens``, ``weight_mask`` and
    what stage 1 recorded) of a token file written by ``acamkd maskd-tokens``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to make one).
        ValueError: not a token file (another safetensors file, a torch checkpoint, a damaged file).
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"method.options.token_file: no file at {path}. Learn the tokens first with "
            f"`acamkd maskd-tokens CONFIG --out {path}` (stage 1 on the frozen teacher), or set "
            f"method.options.token_file=auto to learn them in the run folder")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"method.options.token_file: {path} is not a safetensors token file ({err}); "
                         f"write one with `acamkd maskd-tokens CONFIG --out {path}`") from None
    if meta.get("format") != TOKEN_FILE_FORMAT:
        raise ValueError(f"method.options.token_file: {path} is not a MasKD token file (metadata format "
                         f"{meta.get('format')!r}, expected {TOKEN_FILE_FORMAT!r}); write one with "
                         f"`acamkd maskd-tokens CONFIG --out {path}`")
    try:
        for key in ("levels", "channels"):
            meta[key] = json.loads(meta[key])
        meta["num_tokens"] = int(meta["num_tokens"])
        meta["weight_mask"] = meta["weight_mask"] == "true"
    except (KeyError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"method.options.token_file: {path} has damaged or missing metadata ({type(err).__name__}: "
                         f"{err}); write it again with `acamkd maskd-tokens CONFIG --out {path}`") from None
    return tensors, meta


# ------------------------------------------------------------------------------ the loss
def maskd_level_loss(masks: Tensor, weights: Tensor | None, aligned: Tensor, teacher: Tensor,
                     eps: float = 0.0) -> Tensor:
    """The unweighted MasKD loss of one level (0-dim).

    ``masks`` ``(N, M, H, W)``, ``weights`` ``(N, M)`` or None, ``aligned`` and ``teacher``
    ``(N, C, H, W)``, all of one dtype: ``L_i[n, c] = sum_p m_i^2 (s - t)^2 / (sum_p m_i + eps)``,
    then ``mean_n sum_i p_i mean_c L_i`` (with weights) or ``mean_{n, i, c} L_i`` (without).
    A mask that is exactly 0 everywhere (a sigmoid saturated by large raw features) selects nothing:
    its ``L_i`` is 0, where the authors' code (``eps`` 0) gives 0/0 = NaN; elsewhere the same value.
    """
    err = (aligned - teacher).square()  # (N, C, H, W)
    per = torch.einsum("nmhw,nchw->nmc", masks.square(), err)  # (N, M, C): sum_p (m_i (s - t))^2
    mass = masks.sum((2, 3))[:, :, None] + eps  # (N, M, 1); 0 only for an all-zero mask (then per is 0 too)
    per = per / torch.where(mass > 0, mass, torch.ones_like(mass))
    if weights is None:
        return per.mean()
    return (per.mean(2) * weights).sum(1).mean()


class MasKDLevel(nn.Module):
    """One level: ``tokens`` (:class:`ReceptiveTokens` on the teacher's ``C_t`` channels, frozen)
    and ``align`` (1x1 conv ``C_s -> C_t`` with bias, or None for ``align="none"``).

    Raises:
        ValueError: ``align="none"`` with ``C_s != C_t`` (names the option).
    """

    def __init__(self, teacher_channels: int, student_channels: int, options: MasKDOptions) -> None:
        super().__init__()
        if options.align == "none" and student_channels != teacher_channels:
            raise ValueError(f"align='none' needs equal channel counts, got student {student_channels} and teacher "
                             f"{teacher_channels}: set method.options.align=conv")
        self.tokens = ReceptiveTokens(teacher_channels, options.num_tokens, options.weight_mask)
        self.tokens.requires_grad_(False)
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if options.align == "conv" else None


@register("maskd", options=MasKDOptions)
class MasKD(LevelwiseMethod):
    """MasKD (stage 2) over several tapped levels: per level frozen receptive tokens (from the
    stage-1 file) and a trainable 1x1 alignment.

    ``MasKD(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (options: :class:`MasKDOptions` or its fields as keywords). ``token_file`` is loaded at
    construction unless it is ``"auto"``: then the tokens keep their random initialisation until
    the engine resolves ``auto`` (``acamkd distill`` learns them in the run folder first,
    :func:`acamkd.engine.maskd_tokens.resolve_token_file`) or a state dict is loaded (a checkpoint,
    ``acamkd viz masks``). The call ``MasKD(teacher_feats, student_feats, batch=None)`` returns
    ``{"<level>.maskd": w * L}``, each 0-dim fp32 (fp64 for fp64 inputs); ``batch`` is not used.
    :meth:`statistics` gives per level the unweighted loss, the mean of the masks used, their Dice
    coefficient and whether the student's masks are on; :meth:`inspect` gives per level
    ``teacher_masks``, ``student_masks`` (the tokens on the aligned student) and, after the warm-up,
    ``applied_masks`` (their product), all ``(N, M, H, W)``, plus ``token_weights`` ``(N, M)`` and
    ``aligned_student``.

    Raises (construction): FileNotFoundError / ValueError for a missing or unfit token file, naming
    ``method.options.token_file`` and the option or level that does not fit; the input checks of
    :class:`~acamkd.methods.base.LevelwiseMethod` at call time.
    """

    options: MasKDOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step = 0
        if self.options.token_file != AUTO:
            self.load_tokens(self.options.token_file)

    def build_level(self, teacher_channels: int, student_channels: int, options: MasKDOptions) -> nn.Module:
        return MasKDLevel(teacher_channels, student_channels, options)

    # ------------------------------------------------------------------ the training step
    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the authors' ``_iter``)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Set the optimizer-step count (e.g. in a user's own loop)."""
        self._step = check_int("step", step, 0)

    def optimizer_stepped(self) -> None:
        """Called by the engine after every optimizer step (``engine/step.py``)."""
        self._step += 1

    def student_masks_on(self) -> bool:
        """Whether the masks are multiplied by the student's at the current step."""
        return self.options.custom_mask and self._step >= self.options.custom_mask_warmup

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_extra_state(self, state: Any) -> None:
        self._step = int(state["step"]) if isinstance(state, dict) and "step" in state else 0

    # ------------------------------------------------------------------ the token file
    def load_tokens(self, path: str) -> None:
        """Copy the tokens (and branches) of the stage-1 file ``path`` into every level; they stay frozen.

        Raises:
            FileNotFoundError, ValueError: see :func:`load_token_file`; a level, channel count,
                ``num_tokens`` or ``weight_mask`` that does not fit this method (each named).
        """
        tensors, meta = load_token_file(path)
        where = f"method.options.token_file: {path}"
        if meta["num_tokens"] != self.options.num_tokens:
            raise ValueError(f"{where} holds {meta['num_tokens']} tokens per level, method.options.num_tokens is "
                             f"{self.options.num_tokens}: set num_tokens={meta['num_tokens']} or learn new tokens")
        if meta["weight_mask"] != self.options.weight_mask:
            raise ValueError(f"{where} was learnt with weight_mask={str(meta['weight_mask']).lower()}, "
                             f"method.options.weight_mask is {str(self.options.weight_mask).lower()}: make them agree")
        missing = [n for n in self.level_names if n not in meta["levels"]]
        if missing:
            raise ValueError(f"{where} has levels {meta['levels']}, the method's levels {missing} are not among them: "
                             f"learn the tokens with the same teacher taps (acamkd maskd-tokens CONFIG)")
        for name in self.level_names:
            module: ReceptiveTokens = self.level(name).tokens
            if meta["channels"][name] != self.teacher_channels[name]:
                raise ValueError(f"{where}: level {name!r} has {meta['channels'][name]} channels in the file, "
                                 f"the teacher's tap has {self.teacher_channels[name]}: learn the tokens on this "
                                 f"teacher")
            prefix = f"{level_key(name)}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(f"{where}: level {name!r} does not fit: {err}") from None
            module.requires_grad_(False)

    # ------------------------------------------------------------------ the loss
    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        opts = self.options
        if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                         align_corners=False)
        inspecting = not torch.is_grad_enabled()
        with torch.autocast(teacher_feat.device.type, enabled=False):
            student = upcast(student_feat)
            if level.align is not None:
                student = F.conv2d(student, _cast(level.align.weight, student.dtype),
                                   _cast(level.align.bias, student.dtype))  # (N, C_t, H, W)
            teacher = upcast(teacher_feat).to(student.dtype)
            tokens: ReceptiveTokens = level.tokens
            on = self.student_masks_on()
            with torch.no_grad():
                teacher_masks = tokens.masks(teacher)  # (N, M, H, W)
                weights = tokens.token_weights(teacher) if opts.weight_mask else None
                student_masks = tokens.masks(student.detach()) if (on or inspecting) else None
                masks = teacher_masks * student_masks if on else teacher_masks
            loss = maskd_level_loss(masks, weights, student, teacher, opts.norm_eps)
        stats = {"maskd": loss.detach(), "mask_mean": masks.mean(), "dice": dice_coefficient(masks),
                 "student_masks_on": torch.tensor(float(on), dtype=loss.dtype, device=loss.device)}
        tensors: dict[str, Tensor] = {"aligned_student": student}
        if inspecting:
            tensors.update(teacher_masks=teacher_masks, student_masks=student_masks)
            if on:
                tensors["applied_masks"] = masks
            if weights is not None:
                tensors["token_weights"] = weights
        return LevelResult(losses={"maskd": opts.weight * loss}, stats=stats, tensors=tensors)
