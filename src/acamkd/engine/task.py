"""The contract between the engine and one kind of dense prediction: :class:`Task`.

The engine (``engine/run.py`` builds, ``engine/step.py`` steps, ``engine/trainer.py`` loops) is
task-agnostic: everything it knows about data, models, losses and metrics goes through the
members below, each documented with what it is for. ``DetectionTask`` (``engine/detection.py``)
and ``SegmentationTask`` (``engine/segmentation.py``) implement it; a new task (e.g. instance
segmentation) is one new file implementing the abstract members, plus a line in
``engine/run.py:build_task``.

A *batch* is whatever the task's ``collate`` returns (detection: ``(images, targets)`` lists;
segmentation: ``(images (B, 3, H, W), labels (B, H, W))``); ``to_device`` splits it into
``(images, targets)`` on the device, the two things every model call takes.

Shared here once: generating the built-in data behind a barrier, building models from the model
registry (``acamkd.models.registry``), SyncBatchNorm conversion, building taps (the configured
module names, or the model family's default levels), learning the taps' channels, the teacher's
cheap forward, and telling which items of a padded distributed shard are real.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from acamkd.config import Config, ModelConfig
from acamkd.engine.distributed import DistInfo, barrier
from acamkd.methods.batch import DistillBatch
from acamkd.models import FeatureTaps
from acamkd.models.registry import ModelSpec, get_model_spec
from acamkd.models.taps import tap_channels as probe_tap_channels

__all__ = ["Task", "real_items"]


class Task(abc.ABC):
    """What a training task provides to the engine. Built once per run from the config.

    Class attributes:
        name: the ``student.task`` value this class serves ("detection", "segmentation").
        drop_last: drop an epoch's short last batch (BatchNorm on 1x1 pooled maps cannot train on
            one image); the trainer counts batches per epoch accordingly.
        inherit_prefixes: state-dict prefixes a student may inherit from the teacher
            (``train.inherit_teacher``; the paper's neck + head inheritance).
        inherit_all_or_nothing: inherit each prefix as a whole or not at all (True), or tensor by
            tensor where shapes match (False).
    """

    name: ClassVar[str]
    drop_last: ClassVar[bool] = False
    inherit_prefixes: ClassVar[tuple[str, ...]] = ()
    inherit_all_or_nothing: ClassVar[bool] = False

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info

    # ================================================================== data
    @abc.abstractmethod
    def datasets(self) -> tuple[Any, Any]:
        """``(train, val)`` datasets with the training and evaluation transforms."""

    @abc.abstractmethod
    def val_dataset(self) -> Any:
        """The validation set alone (``eval`` and ``export`` read no training annotations)."""

    @staticmethod
    @abc.abstractmethod
    def collate(items: list) -> Any:
        """A list of dataset items -> one batch (the DataLoader's ``collate_fn``)."""

    @staticmethod
    @abc.abstractmethod
    def model_classes(dataset: Any) -> int:
        """The class count models are built with for ``dataset`` (detection: foreground only)."""

    def class_metadata(self, dataset: Any) -> dict[str, str]:
        """What an exported model records of its classes (safetensors metadata: strings; lists as
        JSON): at least ``class_names``, in the order of the model's outputs. Default: nothing."""
        return {}

    def built_in_data(self) -> None:
        """Generate the built-in ``shapes`` data into ``data.root`` on the main process (cached by its
        parameters, so a second call writes nothing); the other processes wait for it."""
        data = self.cfg.data
        if data.dataset != "shapes":
            return
        if self.info.is_main:
            from acamkd.data.synthetic import make_shapes

            s = data.shapes
            make_shapes(data.root, train=s.train, val=s.val, size=tuple(s.size), seed=s.seed,
                        difficulty=s.difficulty)
        barrier(self.info)

    # ================================================================== models
    @abc.abstractmethod
    def build_model(self, model_cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
        """The configured ``role`` ("student" | "teacher") model for ``num_classes`` classes, its
        ``checkpoint`` loaded strictly, evaluation limits set, SyncBN where configured."""

    def check_pair(self, student: nn.Module, teacher: nn.Module) -> None:
        """Raise ``ValueError`` if this student cannot be distilled from this teacher (e.g. logits
        of different class counts). Default: any pair."""

    def spec(self, model_cfg: ModelConfig | None = None) -> ModelSpec:
        """The model registry's entry for ``model_cfg.arch`` (default: the student's) in this task."""
        return get_model_spec((model_cfg or self.cfg.student).arch, task=self.name)

    def build_from_registry(self, model_cfg: ModelConfig, num_classes: int, **options: Any) -> nn.Module:
        """``model_cfg``'s model from its registry entry with ``num_classes`` classes (detectors: plus
        background), ``checkpoint`` loaded strictly; remembers which entry built it."""
        spec = self.spec(model_cfg)
        classes = num_classes + (1 if spec.background_class else 0)
        model = spec.build(model_cfg.backbone, classes, pretrained=model_cfg.pretrained,
                           checkpoint=model_cfg.checkpoint, **options)
        spec.set_eval_limits(model, self.cfg.eval.score_thresh, self.cfg.eval.max_detections)
        model._acamkd_arch = spec.name  # for default taps and the teacher pass
        return model

    def spec_of(self, model: nn.Module) -> ModelSpec:
        """The registry entry that built ``model`` (the student's arch for a model built elsewhere)."""
        return get_model_spec(getattr(model, "_acamkd_arch", self.cfg.student.arch), task=self.name)

    def default_taps(self, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
        """``(taps, rename)`` for :class:`FeatureTaps` recording the model family's default levels
        (detectors: every FPN level ``p3``..; segmenters: the stride-8 ``logits``)."""
        return self.spec_of(model).default_taps(model)

    def default_tap_channels(self, model: nn.Module) -> dict[str, int]:
        """Channels of each default level, read off the model (no forward)."""
        return self.spec_of(model).tap_channels(model)

    def _taps_config(self, role: str) -> list[str] | None:
        model_cfg = self.cfg.student if role == "student" else self.cfg.teacher
        return None if model_cfg is None else model_cfg.taps

    def make_taps(self, model: nn.Module, role: str) -> FeatureTaps:
        """Forward hooks recording ``role``'s distilled features: ``{role}.taps`` if configured, else
        the default levels. The hooks stay on the model for the run (they cost nothing unread)."""
        custom = self._taps_config(role)
        return FeatureTaps(model, custom) if custom else FeatureTaps(model, *self.default_taps(model))

    def tap_channels(self, model: nn.Module, role: str, sample: list[Tensor]) -> dict[str, int]:
        """Channels per tapped level: read off the model for the default taps; for configured taps
        learned from one eval-mode forward of ``sample`` (a list of one image, as the dataset gives)."""
        custom = self._taps_config(role)
        if not custom:
            return self.default_tap_channels(model)
        return probe_tap_channels(model, custom, self.model_input(sample))

    @staticmethod
    def model_input(images: list[Tensor]) -> Any:
        """What the models take for a list of images (detection: the list; segmentation: a stack)."""
        return images

    def maybe_sync_batchnorm(self, model: nn.Module, model_cfg: ModelConfig, when: tuple[str, ...]) -> nn.Module:
        """SyncBatchNorm when ``model_cfg.norm`` is in ``when`` and the run is multi-GPU (GPU-only op:
        CPU processes under gloo keep their own statistics)."""
        if model_cfg.norm in when and self.info.distributed and self.info.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    # ================================================================== forward passes
    @staticmethod
    @abc.abstractmethod
    def to_device(batch: Any, device: torch.device) -> tuple[Any, Any]:
        """A collated batch -> ``(images, targets)`` on ``device``."""

    @staticmethod
    @abc.abstractmethod
    def batch_size(batch: Any) -> int:
        """Images in a collated batch."""

    @abc.abstractmethod
    def student_forward(self, student: nn.Module, taps: FeatureTaps, images: Any,
                        targets: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One training forward: ``(task losses, student features)``; features keep their graph."""

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module, taps: FeatureTaps | None, images: Any) -> dict[str, Tensor]:
        """The teacher's features for ``images``, no grad. Default levels (``taps`` None): the
        registry's cheap pass, computing only what they need (detectors: transform + backbone/FPN,
        no head, no NMS; segmenters: the stride-8 logits, no upsampling). Configured taps: a full
        forward, recorded by ``taps``."""
        if taps is None:
            return self.spec_of(teacher).teacher_features(teacher, images)
        teacher(images)
        return taps.features()

    def teacher_taps(self, teacher: nn.Module) -> FeatureTaps | None:
        """Hooks for the teacher's configured taps, or None for the default levels (which
        :meth:`teacher_forward` reads with the registry's cheap pass)."""
        return self.make_taps(teacher, "teacher") if self._taps_config("teacher") else None

    @abc.abstractmethod
    def distill_batch(self, images: Any, targets: Any) -> DistillBatch:
        """What methods may know of the batch, in the frame of the input the features came from."""

    @abc.abstractmethod
    def random_batch(self, batch_size: int, size: tuple[int, int], num_classes: int,
                     generator: torch.Generator) -> Any:
        """A collated batch of random images of ``size`` (H, W) with plausible targets, for
        benchmarks and cost reports (speed does not depend on the pixel values)."""

    # ================================================================== evaluation
    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: Any, dataset: Any) -> dict[str, float]:
        """The task's metrics of ``model`` on ``loader`` (this process's shard), every image counted
        once across processes; the same dict on every process."""


def real_items(loader: Any) -> int:
    """How many of the loader's items on this process are real: ``ResumableSampler`` pads the last
    shard by wrapping around, and those repeats must not be scored twice."""
    sampler = getattr(loader, "sampler", None)
    if not all(hasattr(sampler, a) for a in ("length", "rank", "world_size", "per_rank")):
        return len(loader.dataset)
    return max(0, -(-(sampler.length - sampler.rank) // sampler.world_size))  # ranks r, r+W, ... < length
