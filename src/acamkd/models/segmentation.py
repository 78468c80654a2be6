"""Segmenter builders (DeepLabV3, PSPNet) on segmentation-models-pytorch encoders, output stride 8.

Every model is a :class:`Segmenter`, a small wrapper with three submodules and one upsampling step::

    x (B, 3, H, W) normalised image
      -> encoder     smp encoder, dilated to output stride 8; returns the list of its stage
                     features, the deepest (B, C_enc, ceil(H/8), ceil(W/8))
      -> decoder     DeepLabV3: smp's ASPP decoder (rates 12/24/36 at OS 8, 6/12/18 at OS 16);
                     PSPNet: :class:`PSPDecoder` (pyramid pooling + 3x3 conv); (B, C_dec, h, w)
      -> classifier  the class logits at stride 8, (B, K, h, w) with h = ceil(H/8), w = ceil(W/8)
      -> bilinear upsampling (align_corners=False) to (B, K, H, W): what ``forward`` returns.

The size rule: each of the stem conv, the max pool and layer2 (ResNet; the three stride-2 convs
for MobileNetV2) maps n to ceil(n/2) (kernel 3, padding 1 or kernel 7, padding 3), and
ceil(ceil(ceil(n/2)/2)/2) = ceil(n/8); e.g. 65x97 -> 9x13, 512x1024 -> 64x128.

Taps (:func:`segmenter_taps`): ``"logits" -> "classifier"`` (the paper's tap: the logits before
the final upsampling, M = K masks), optionally ``"decoder" -> "decoder"`` (the decoder output)
and ``"encoder" -> the deepest encoder stage`` (``encoder.layer4`` for ResNets,
``encoder.features.18`` for MobileNetV2).

PSPNet-R18 is *not* smp's ``PSPNet`` (which truncates the encoder to depth 3, a weaker model):
it is the full 4-stage ResNet-18, dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4,
as in the PSPNet/CIRKD line of papers), with :class:`PSPDecoder`: bins 1, 2, 3, 6, each
avg-pool -> 1x1 conv to C_enc/4 -> BN -> ReLU -> bilinear upsampling, concatenated with the input
(2 * C_enc = 1024 channels), then 3x3 conv to 512 -> BN -> ReLU; the classifier is
dropout 0.1 -> 1x1 conv. 512 bottleneck channels are the original PSPNet's width, kept for R18 as
in the distillation papers' PSPNet-R18 (mmseg's own R18 config uses 128).

BatchNorm on 1x1 pooled maps (the PSP bin 1, smp's ASPP image pooling) needs a batch of at least 2
in training mode; evaluation works with any batch.

Weights come from local files only (``encoder_weights=None`` always; nothing downloads):
``pretrained`` is a torchvision ImageNet state dict of the backbone (``torchvision.models.resnet18/
resnet101/mobilenet_v2().state_dict()`` keys; smp's encoders use the same names), loaded strictly
into ``model.encoder`` with the classifier (``fc.*`` / ``classifier.*``) dropped; ``checkpoint`` is
a whole-model state dict (as :meth:`Segmenter.state_dict` writes it), loaded strictly.
"""
from __future__ import annotations

import os

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import initialization as smp_init
from torch import Tensor, nn

from acamkd.models.weights import load_state_dict_file, load_weights_strict

__all__ = [
    "PSP_BINS",
    "PSP_CHANNELS",
    "SEGMENTER_ARCHS",
    "PSPDecoder",
    "Segmenter",
    "build_segmenter",
    "load_pretrained_encoder",
    "segmenter_taps",
]

# arch -> supported backbones (smp encoder names, equal to torchvision's model names).
SEGMENTER_ARCHS: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("resnet101", "resnet18", "mobilenet_v2"),
    "pspnet": ("resnet18",),
}
PSP_BINS = (1, 2, 3, 6)
PSP_CHANNELS = 512  # bottleneck width after the pyramid pooling (original PSPNet; see module doc)
_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# Deepest encoder stage, for the optional "encoder" tap, and the torchvision classifier prefix
# that the encoder lacks (dropped from a pretrained ImageNet file).
_DEEPEST = {"resnet18": "encoder.layer4", "resnet101": "encoder.layer4", "mobilenet_v2": "encoder.features.18"}
_TV_CLASSIFIER = {"resnet18": "fc.", "resnet101": "fc.", "mobilenet_v2": "classifier."}


class Segmenter(nn.Module):
    """``encoder`` -> ``decoder`` -> ``classifier`` (stride-8 logits) -> bilinear upsampling.

    ``forward(x)``: (B, 3, H, W) -> full-resolution logits (B, K, H, W).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, classifier: nn.Module, *, arch: str,
                 backbone: str, num_classes: int, output_stride: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = classifier
        self.arch, self.backbone, self.num_classes, self.output_stride = arch, backbone, num_classes, output_stride

    def logits(self, x: Tensor) -> Tensor:
        """The stride-8 class logits (B, K, ceil(H/8), ceil(W/8)): all a teacher's tap needs."""
        features = self.encoder(x)                # list of stage features, deepest last
        return self.classifier(self.decoder(features))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, backbone={self.backbone}, num_classes={self.num_classes}, " \
               f"output_stride={self.output_stride}"


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


def _check(arch: str, backbone: str, num_classes: int, output_stride: int) -> None:
    if arch not in SEGMENTER_ARCHS:
        raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {sorted(SEGMENTER_ARCHS)}")
    if backbone not in SEGMENTER_ARCHS[arch]:
        raise ValueError(f"{arch} supports backbones {list(SEGMENTER_ARCHS[arch])}, got {backbone!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if output_stride not in _ASPP_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")


def load_pretrained_encoder(model: Segmenter, path: str | os.PathLike) -> None:
    """Load a local torchvision ImageNet state dict of ``model.backbone`` into ``model.encoder``,
    strictly; the ImageNet classifier (``fc.*``/``classifier.*``) is dropped. Errors name the file."""
    path = os.fspath(path)
    state = load_state_dict_file(path)
    drop = _TV_CLASSIFIER[model.backbone]
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    load_weights_strict(model.encoder, state, path,
                        f"the {model.backbone} encoder (expects torchvision {model.backbone} ImageNet keys, "
                        f"'{drop}*' ignored)")


def build_segmenter(arch: str, backbone: str, num_classes: int = 19, pretrained: str | os.PathLike | None = None,
                    checkpoint: str | os.PathLike | None = None, output_stride: int = 8) -> Segmenter:
    """A :class:`Segmenter` for ``arch`` in :data:`SEGMENTER_ARCHS` with ``num_classes`` outputs.

    ``pretrained``: local torchvision ImageNet weights for the encoder; ``checkpoint``: local
    whole-model weights (applied after ``pretrained``). Both load strictly; nothing downloads.
    """
    _check(arch, backbone, num_classes, output_stride)
    if arch == "deeplabv3":
        smp_model = smp.DeepLabV3(encoder_name=backbone, encoder_weights=None, encoder_output_stride=output_stride,
                                  decoder_atrous_rates=_ASPP_RATES[output_stride], classes=num_classes)
        encoder, decoder = smp_model.encoder, smp_model.decoder
        classifier = smp_model.segmentation_head[0]  # the 1x1 conv; smp's Upsample/Identity are dropped
    else:  # pspnet: full 4-stage encoder, dilated
        encoder = smp.encoders.get_encoder(backbone, weights=None, depth=5, output_stride=output_stride)
        decoder = PSPDecoder(encoder.out_channels[-1])
        classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(decoder.out_channels, num_classes, 1))
        smp_init.initialize_decoder(decoder)
        smp_init.initialize_head(classifier)
    model = Segmenter(encoder, decoder, classifier, arch=arch, backbone=backbone, num_classes=num_classes,
                      output_stride=output_stride)
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
        raise TypeError(f"segmenter_taps expects a model from build_segmenter, got {type(model).__name__}")
    taps = {"logits": "classifier"}
    if decoder:
        taps["decoder"] = "decoder"
    if encoder:
        taps["encoder"] = _DEEPEST[model.backbone]
    return taps
