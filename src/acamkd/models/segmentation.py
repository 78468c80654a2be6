"""Segmenter builders (DeepLabV3, PSPNet) on segmentation-models-pytorch encoders, output stride 8.

Every model is a :class:`Segmenter`, a small wrapper with three (four) submodules and one upsampling step::

    x (B, 3, H, W) normalised image
      -> encoder     smp encoder, dilated to output stride 8; returns the list of its stage
                     features, the deepest (B, C_enc, ceil(H/8), ceil(W/8))
      -> decoder     DeepLabV3: smp's ASPP decoder at 512 channels, 128 for MobileNetV2 (rates 12/24/36 at OS 8,
                     6/12/18 at OS 16; 1x1 projection with dropout 0.5, then 3x3 conv + BN + ReLU);
                     PSPNet: :class:`PSPDecoder` (pyramid pooling + 3x3 conv to 128); (B, C_dec, h, w)
      -> classifier  dropout 0.1 -> 1x1 conv: the class logits at stride 8, (B, K, h, w) with
                     h = ceil(H/8), w = ceil(W/8)
      -> bilinear upsampling (align_corners=False) to (B, K, H, W): what ``forward`` returns.
    aux (ResNet encoders, training only): an FCN head on the third stage's features (layer3,
      stride 8): 3x3 conv to C/4 + BN + ReLU + dropout 0.1 -> 1x1 conv to K; its upsampled
      logits add ``AUX_WEIGHT`` (0.4) x cross-entropy to the task loss (:meth:`Segmenter.forward_train`).

The heads follow CIRKD (github.com/winycg/CIRKD, ``models/deeplabv3.py``, ``models/pspnet.py``),
whose training code the segmentation distillation papers (MasKD, ACAM-KD) build on: DeepLabV3's
ASPP and head at 512 channels for ResNet-18 and ResNet-101 alike, at 128 for MobileNetV2, whose
encoder ends at the 320-channel block (``features.17``; torchvision's final 1x1 conv to 1280 is
dropped, ``models/deeplabv3_mobile.py``); PSPNet-R18's bottleneck at
128 channels (mmseg's R18 PSPNet uses 128 too); the auxiliary head on for ResNet students and the
teacher, off for MobileNetV2 (CIRKD's ``train_kd.py``).

The size rule: each of the stem conv, the max pool and layer2 (ResNet; the three stride-2 convs
for MobileNetV2) maps n to ceil(n/2) (kernel 3, padding 1 or kernel 7, padding 3), and
ceil(ceil(ceil(n/2)/2)/2) = ceil(n/8); e.g. 65x97 -> 9x13, 512x1024 -> 64x128.

Taps (:func:`segmenter_taps`): ``"logits" -> "classifier"`` (the paper's tap: the logits before
the final upsampling, M = K masks), optionally ``"decoder" -> "decoder"`` (the decoder output)
and ``"encoder" -> the deepest encoder stage`` (``encoder.layer4`` for ResNets,
``encoder.features.17`` for MobileNetV2).

PSPNet-R18 is *not* smp's ``PSPNet`` (which truncates the encoder to depth 3, a weaker model):
it is the full 4-stage ResNet-18, dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4,
as in the PSPNet/CIRKD line of papers), with :class:`PSPDecoder`: bins 1, 2, 3, 6, each
avg-pool -> 1x1 conv to C_enc/4 -> BN -> ReLU -> bilinear upsampling, concatenated with the input
(2 * C_enc = 1024 channels), then 3x3 conv to 128 -> BN -> ReLU.

BatchNorm on 1x1 pooled maps (the PSP bin 1, smp's ASPP image pooling) needs a batch of at least 2
in training mode; evaluation works with any batch.

Weights come from local files only (``encoder_weights=None`` always; nothing downloads):
``pretrained`` is a torchvision ImageNet state dict of the backbone (``torchvision.models.resnet18/
resnet101/mobilenet_v2().state_dict()`` keys; smp's encoders use the same names), loaded strictly
into ``model.encoder`` with the classifier (``fc.*`` / ``classifier.*``) dropped; ``checkpoint`` is
a whole-model state dict (as :meth:`Segmenter.state_dict` writes it), loaded strictly.

Both architectures are registered in :mod:`acamkd.models.registry` at the end of this file (default
tap ``"logits"`` at stride 8, no padding). segmentation-models-pytorch is imported only when a model
is built, so registering (and importing this module) does not load it.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.models.registry import (
    ModelSpec,
    UnknownModelError,
    did_you_mean,
    get_model_spec,
    list_models,
    register_model,
)
from acamkd.models.weights import load_state_dict_file, load_weights_strict

__all__ = [
    "ASPP_CHANNELS",
    "AUX_WEIGHT",
    "PSP_BINS",
    "PSP_CHANNELS",
    "SEGMENTER_ARCHS",
    "PSPDecoder",
    "Segmenter",
    "FCNHead",
    "build_segmenter",
    "build_smp_segmenter",
    "load_pretrained_encoder",
    "segmenter_default_taps",
    "segmenter_tap_channels",
    "segmenter_taps",
    "segmenter_teacher_features",
]

# This family's arch -> supported backbones (smp encoder names, equal to torchvision's model names),
# registered below. SEGMENTER_ARCHS (every registered segmenter -> its backbones) is read from the
# registry on access: see __getattr__ at the end of this file.
_SMP_ARCHS: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("resnet101", "resnet18", "mobilenet_v2"),
    "pspnet": ("resnet18",),
}
PSP_BINS = (1, 2, 3, 6)
PSP_CHANNELS = 128  # PSPNet-R18 bottleneck width after the pyramid pooling (CIRKD, mmseg; module doc)
# DeepLabV3 ASPP and head width per encoder (CIRKD: 512 for R18 and R101 alike, 128 for MobileNetV2).
ASPP_CHANNELS = {"resnet18": 512, "resnet101": 512, "mobilenet_v2": 128}
MOBILENET_V2_CHANNELS = 320  # CIRKD's MobileNetV2 encoder output (no final 1x1 conv to 1280)
AUX_WEIGHT = 0.4  # weight of the auxiliary head's cross-entropy (CIRKD, PSPNet)
CLASSIFIER_DROPOUT = 0.1
_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# Deepest encoder stage, for the optional "encoder" tap, and the torchvision classifier prefix
# that the encoder lacks (dropped from a pretrained ImageNet file).
_DEEPEST = {"resnet18": "encoder.layer4", "resnet101": "encoder.layer4", "mobilenet_v2": "encoder.features.17"}
_AUX_DEFAULT = {"resnet18": True, "resnet101": True, "mobilenet_v2": False}  # CIRKD: ResNets only
# torchvision keys the encoder does not hold: the ImageNet classifier, and MobileNetV2's final 1x1
# conv to 1280 channels (CIRKD's DeepLabV3-MobileNetV2 ends at the 320-channel block).
_TV_NOT_IN_ENCODER = {"resnet18": ("fc.",), "resnet101": ("fc.",),
                      "mobilenet_v2": ("classifier.", "features.18.")}


class Segmenter(nn.Module):
    """``encoder`` -> ``decoder`` -> ``classifier`` (stride-8 logits) -> bilinear upsampling.

    ``forward(x)``: (B, 3, H, W) -> full-resolution logits (B, K, H, W).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, classifier: nn.Module, *, arch: str,
                 backbone: str, num_classes: int, output_stride: int, aux: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = classifier
        self.aux = aux  # auxiliary head on the third stage (training only), or None
        self.arch, self.backbone, self.num_classes, self.output_stride = arch, backbone, num_classes, output_stride

    def _logits(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(x)                # list of stage features, deepest last
        return self.classifier(self.decoder(features)), features

    def logits(self, x: Tensor) -> Tensor:
        """The stride-8 class logits (B, K, ceil(H/8), ceil(W/8)): all a teacher's tap needs."""
        return self._logits(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        return _upsample(self.logits(x), x)

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Full-resolution logits and, with an auxiliary head, its full-resolution logits (else None).

        Upsampled in fp32 even under bf16/fp16 autocast, so the cross-entropy sees unrounded logits.
        """
        logits, features = self._logits(x)
        aux = None if self.aux is None else _upsample(self.aux(features[-2]).float(), x)  # from layer3
        return _upsample(logits.float(), x), aux

    def extra_repr(self) -> str:
        return f"arch={self.arch}, backbone={self.backbone}, num_classes={self.num_classes}, " \
               f"output_stride={self.output_stride}, aux={self.aux is not None}"


def _upsample(logits: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(logits, size=like.shape[-2:], mode="bilinear", align_corners=False)


class FCNHead(nn.Sequential):
    """Auxiliary head: 3x3 conv to ``in_channels // 4`` -> BN -> ReLU -> dropout 0.1 -> 1x1 conv to K."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter),
                         nn.ReLU(inplace=True), nn.Dropout2d(CLASSIFIER_DROPOUT), nn.Conv2d(inter, num_classes, 1))


class _PoolBranch(nn.Sequential):
    """Average-pool to ``bin x bin`` -> 1x1 conv -> BN -> ReLU; upsampled back in :class:`PSPDecoder`."""

    def __init__(self, in_channels: int, out_channels: int, bin_size: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(bin_size), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class PSPDecoder(nn.Module):
    """Pyramid pooling module (bins 1, 2, 3, 6, each to ``in_channels // 4``), concatenated with its
    input, then 3x3 conv -> BN -> ReLU to ``channels``. Takes the encoder's feature list, uses the last.
    """

    def __init__(self, in_channels: int, channels: int = PSP_CHANNELS, bins: tuple[int, ...] = PSP_BINS) -> None:
        super().__init__()
        branch = in_channels // len(bins)
        self.branches = nn.ModuleList(_PoolBranch(in_channels, branch, b) for b in bins)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + branch * len(bins), channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU())  # not in place: the output may be tapped
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]  # (B, C, h, w)
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # (B, channels, h, w)


def _check_names(arch: str, backbone: str, backbones: tuple[str, ...]) -> None:
    if backbone not in backbones:
        raise ValueError(f"{arch} supports backbones {list(backbones)}, got {backbone!r}"
                         f"{did_you_mean(backbone, backbones, list_known=False)}")


def _check(arch: str, backbone: str, num_classes: int, output_stride: int) -> None:
    if arch not in _SMP_ARCHS:
        raise ValueError(f"unknown segmentation arch {arch!r} for build_smp_segmenter{did_you_mean(arch, _SMP_ARCHS)}")
    _check_names(arch, backbone, _SMP_ARCHS[arch])
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if output_stride not in _ASPP_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")


def load_pretrained_encoder(model: Segmenter, path: str | os.PathLike) -> None:
    """Load a local torchvision ImageNet state dict of ``model.backbone`` into ``model.encoder``,
    strictly; the ImageNet classifier (``fc.*``/``classifier.*``) and, for MobileNetV2, the final
    1x1 conv (``features.18.*``) are dropped. Errors name the file."""
    path = os.fspath(path)
    state = load_state_dict_file(path)
    drop = _TV_NOT_IN_ENCODER[model.backbone]
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    load_weights_strict(model.encoder, state, path,
                        f"the {model.backbone} encoder (expects torchvision {model.backbone} ImageNet keys, "
                        f"{', '.join(repr(d + '*') for d in drop)} ignored)")


def build_segmenter(arch: str, backbone: str, num_classes: int = 19, pretrained: str | os.PathLike | None = None,
                    checkpoint: str | os.PathLike | None = None, **options: Any) -> nn.Module:
    """Build the registered segmenter ``arch`` (``deeplabv3``, ``pspnet``, ...) with ``num_classes``
    output logits (background, if the dataset has one, is one of them: no class is added).

    ``pretrained``/``checkpoint``: local weight files; ``options`` go to the spec's builder (for
    DeepLabV3/PSPNet: ``output_stride``, ``aux_head``, see :func:`build_smp_segmenter`). Raises
    :class:`~acamkd.models.registry.UnknownModelError` (a ``ValueError``) for an unknown or
    non-segmentation ``arch``, ``ValueError`` for a backbone it does not take (both name close matches).
    """
    known = list_models("segmentation")
    if arch not in known:
        raise UnknownModelError(f"unknown segmentation arch {arch!r}{did_you_mean(arch, known)}")
    spec = get_model_spec(arch, task="segmentation")
    _check_names(arch, backbone, spec.backbones)
    return spec.build(backbone, num_classes, pretrained=pretrained, checkpoint=checkpoint, **options)


def build_smp_segmenter(arch: str, backbone: str, num_classes: int = 19, pretrained: str | os.PathLike | None = None,
                        checkpoint: str | os.PathLike | None = None, output_stride: int = 8,
                        aux_head: bool | None = None) -> Segmenter:
    """This family's builder: a :class:`Segmenter` for ``arch`` ("deeplabv3" | "pspnet") with
    ``num_classes`` outputs, on a segmentation-models-pytorch encoder (imported here, on first build).

    ``pretrained``: local torchvision ImageNet weights for the encoder; ``checkpoint``: local
    whole-model weights (applied after ``pretrained``). Both load strictly; nothing downloads.
    ``output_stride``: 8 (default; the registered ``levels``) or 16. ``aux_head``: the auxiliary FCN
    head on layer3 (None: on for ResNet encoders, off for MobileNetV2, as CIRKD trains them;
    MobileNetV2 has no layer3 to put it on). ``ValueError`` for a bad name or value.
    """
    _check(arch, backbone, num_classes, output_stride)
    import segmentation_models_pytorch as smp  # on demand: importing acamkd.models does not load smp
    from segmentation_models_pytorch.base import initialization as smp_init
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder

    if aux_head is None:
        aux_head = _AUX_DEFAULT[backbone]
    if aux_head and not _AUX_DEFAULT[backbone]:
        raise ValueError(f"aux_head: {backbone} has no ResNet third stage to put the auxiliary head on")
    encoder = smp.encoders.get_encoder(backbone, weights=None, depth=5, output_stride=output_stride)
    if backbone == "mobilenet_v2":  # end at the 320-channel block, as CIRKD: drop the 1x1 conv to 1280
        encoder.features[18] = nn.Identity()
        encoder._out_channels = [*encoder._out_channels[:-1], MOBILENET_V2_CHANNELS]
    if arch == "deeplabv3":  # smp's ASPP decoder (what smp.DeepLabV3 builds), at CIRKD's width
        channels = ASPP_CHANNELS[backbone]
        decoder = DeepLabV3Decoder(encoder.out_channels[-1], channels, _ASPP_RATES[output_stride],
                                   aspp_separable=False, aspp_dropout=0.5)
    else:  # pspnet: full 4-stage encoder, dilated
        decoder = PSPDecoder(encoder.out_channels[-1])
        channels = decoder.out_channels
    smp_init.initialize_decoder(decoder)
    classifier = nn.Sequential(nn.Dropout2d(CLASSIFIER_DROPOUT), nn.Conv2d(channels, num_classes, 1))
    smp_init.initialize_head(classifier)
    aux = None
    if aux_head:
        aux = FCNHead(encoder.out_channels[-2], num_classes)  # layer3: 256 (R18) / 1024 (R101) channels
        smp_init.initialize_decoder(aux)
    model = Segmenter(encoder, decoder, classifier, arch=arch, backbone=backbone, num_classes=num_classes,
                      output_stride=output_stride, aux=aux)
    if pretrained is not None:
        load_pretrained_encoder(model, pretrained)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        load_weights_strict(model, load_state_dict_file(checkpoint), checkpoint,
                            f"{arch}-{backbone} with {num_classes} classes")
    return model


def segmenter_taps(model: Segmenter, encoder: bool = False, decoder: bool = False) -> dict[str, str]:
    """``alias -> module path`` for :class:`acamkd.models.FeatureTaps`: ``"logits"`` (the stride-8
    class logits, the paper's tap) always; ``"decoder"`` and ``"encoder"`` (deepest stage) on request."""
    if not isinstance(model, Segmenter):
        raise TypeError(f"segmenter_taps expects a model from build_segmenter, got {type(model).__name__}: "
                        f"to distil another model, name its modules in student.taps / teacher.taps")
    taps = {"logits": "classifier"}
    if decoder:
        taps["decoder"] = "decoder"
    if encoder:
        taps["encoder"] = _DEEPEST[model.backbone]
    return taps


def segmenter_default_taps(model: Segmenter) -> tuple[dict[str, str], dict[str, str]]:
    """``(taps, rename)`` for :class:`~acamkd.models.FeatureTaps`: ``({"logits": "classifier"}, {})``."""
    return segmenter_taps(model), {}


def segmenter_tap_channels(model: Segmenter) -> dict[str, int]:
    """``{"logits": K}``: the default tap's channels are the class count (no forward needed)."""
    segmenter_taps(model)  # TypeError for a model that is not a Segmenter
    return {"logits": model.num_classes}


@torch.no_grad()
def segmenter_teacher_features(model: Segmenter, images: Tensor) -> dict[str, Tensor]:
    """``{"logits": (B, K, ceil(H/8), ceil(W/8))}`` for normalised ``images`` (B, 3, H, W): encoder,
    decoder and classifier only (no upsampling), no grad, eval mode (the model's mode is restored)."""
    segmenter_taps(model)  # TypeError for a model that is not a Segmenter
    was_training = model.training
    model.eval()
    try:
        return {"logits": model.logits(images)}
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ registration
_DESCRIPTIONS = {
    "deeplabv3": "DeepLabV3 (ASPP) at output stride 8 on an smp encoder, CIRKD's heads",
    "pspnet": "PSPNet (pyramid pooling) on the full dilated ResNet-18 at output stride 8, CIRKD's heads",
}
for _arch, _backbones in _SMP_ARCHS.items():
    register_model(ModelSpec(
        name=_arch, task="segmentation", backbones=_backbones, build=functools.partial(build_smp_segmenter, _arch),
        levels={"logits": 8}, size_divisor=1, background_class=False, default_taps=segmenter_default_taps,
        tap_channels=segmenter_tap_channels, teacher_features=segmenter_teacher_features,
        description=_DESCRIPTIONS[_arch]))
del _arch, _backbones


def __getattr__(name: str) -> Any:
    """``SEGMENTER_ARCHS``: every registered segmenter -> its backbones, read from the registry on access."""
    if name == "SEGMENTER_ARCHS":
        return {arch: get_model_spec(arch).backbones for arch in list_models("segmentation")}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
