"""MasKD (``acamkd.methods.maskd``, stage 2; ``acamkd.engine.maskd_tokens``, stage 1) against the
plain line-by-line references of ``acamkd.methods.maskd_reference`` (after hunto/MasKD @ b5af34f),
the switches (frozen tokens, the student-mask warm-up), the Dice formula by hand, option and token
file errors, and a tiny end to end: stage 1 on the built-in shapes data, then a few distill steps."""
from __future__ import annotations

import collections
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acamkd.config import load_config
from acamkd.engine.maskd_tokens import (
    TOKEN_FILE_NAME,
    MaskingHooks,
    stage1_key,
    token_lr_factor,
    write_token_file,
)
from acamkd.methods import build, parse_options
from acamkd.methods.base import OptionError
from acamkd.methods.maskd import (
    PUBLISHED_CONSTANTS,
    MasKD,
    MasKDOptions,
    ReceptiveTokens,
    dice_coefficient,
    load_token_file,
    maskd_level_loss,
)
from acamkd.methods.maskd_reference import (
    reference_dice,
    reference_masked_feature,
    reference_maskd_loss,
    reference_masks,
    reference_token_weights,
)

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
T_CH, S_CH = {"p3": 8, "p4": 8}, {"p3": 4, "p4": 6}
GRIDS = {"p3": (6, 5), "p4": (3, 3)}


def make_feats(teacher_channels=T_CH, student_channels=S_CH, batch=2, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    teacher = {n: torch.randn(batch, c, *GRIDS[n], generator=gen, dtype=dtype) for n, c in teacher_channels.items()}
    student = {n: torch.randn(batch, c, *GRIDS[n], generator=gen, dtype=dtype, requires_grad=True)
               for n, c in student_channels.items()}
    return teacher, student


def randomise_tokens(method: MasKD, scale: float = 0.5, seed: int = 3) -> None:
    """Tokens large enough that the masks differ from 0.5 (the N(0, 0.01) init gives ~0.5 everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in method.level_names:
            tokens = method.level(name).tokens
            tokens.tokens.copy_(scale * torch.randn(tokens.tokens.shape, generator=gen))


def reference_method_loss(method: MasKD, teacher: dict, student: dict, student_masks: bool) -> torch.Tensor:
    """The whole method's weighted loss by the references, in the inputs' dtype."""
    total = 0
    for name in method.level_names:
        level = method.level(name)
        t, s = teacher[name], student[name]
        dt = t.dtype
        aligned = s if level.align is None else F.conv2d(s, level.align.weight.to(dt), level.align.bias.to(dt))
        tokens = level.tokens.tokens.to(dt)
        masks = reference_masks(tokens, t)
        if student_masks:
            masks = masks * reference_masks(tokens, aligned.detach())
        weights = None
        if level.tokens.prob is not None:
            c3, _, c1 = level.tokens.prob
            weights = reference_token_weights(c3.weight.to(dt), c3.bias.to(dt), c1.weight.to(dt), c1.bias.to(dt), t)
        total = total + method.options.weight * reference_maskd_loss(masks, weights, aligned, t,
                                                                     method.options.norm_eps)
    return total


# ------------------------------------------------------------------------------ options
def test_defaults_are_the_retinanet_config_and_constants_are_valid_options():
    opts = MasKDOptions()
    assert (opts.num_tokens, opts.weight, opts.weight_mask, opts.custom_mask, opts.custom_mask_warmup) == \
        (6, 7.0, True, True, 7000)
    assert (opts.token_iterations, opts.token_optimizer, opts.token_lr, opts.token_weight_decay,
            opts.token_schedule, opts.dice_weight, opts.token_file) == (2000, "adam", 0.01, 1e-3, "cosine", 1.0, "auto")
    for constants in PUBLISHED_CONSTANTS.values():
        MasKDOptions(**constants)  # every published setting is expressible
    assert {k: v["weight"] for k, v in PUBLISHED_CONSTANTS.items()}["fcos_r101_r50"] == 10.0
    assert parse_options("maskd", {"weight": 10}).weight == 10.0


def test_a_segmentation_config_gets_the_authors_segmentation_settings(tmp_path):
    from acamkd.engine.maskd_tokens import maskd_options

    seg = os.path.join(DEMO, "shapes_seg_acam.yaml")
    cfg = load_config(seg, ["method.name=maskd", "method.options={}", f"data.root={tmp_path}"])
    assert {k: cfg.method.options[k] for k in PUBLISHED_CONSTANTS["segmentation_logits"]} == \
        PUBLISHED_CONSTANTS["segmentation_logits"]
    given = load_config(seg, ["method.name=maskd", "method.options={num_tokens: 4}", f"data.root={tmp_path}"])
    assert given.method.options["num_tokens"] == 4 and given.method.options["weight_mask"] is False
    det = load_config(os.path.join(DEMO, "shapes_det_acam.yaml"), ["method.name=maskd", "method.options={}"])
    assert det.method.options["weight"] == 7.0 and det.method.options["weight_mask"] is True
    # stage 1 on a config of another method: maskd's defaults for the task
    assert maskd_options(load_config(seg, [f"data.root={tmp_path}"])).num_tokens == 8
    assert maskd_options(det).num_tokens == 6


@pytest.mark.parametrize("option,value,message", [
    ("num_tokens", 0, "integer >= 1"), ("weight", -1.0, ">= 0"), ("custom_mask_warmup", -1, "integer >= 0"),
    ("align", "linear", "one of"), ("token_file", "", "maskd-tokens"), ("token_lr", 0.0, "> 0"),
    ("token_optimizer", "rmsprop", "one of"), ("token_schedule", "step", "one of"),
    ("weight_mask", "yes", "true or false"),
    ("custom_mask", 1, "true or false"), ("norm_eps", -1e-5, ">= 0"), ("token_iterations", 0, "integer >= 1"),
    ("dice_weight", float("nan"), "finite"), ("token_weight_decay", -1.0, ">= 0"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(OptionError, match=message) as info:
        MasKDOptions(**{option: value})
    assert info.value.option == option
    with pytest.raises(ValueError, match=rf"method\.options\.{option}"):
        load_config(os.path.join(DEMO, "shapes_det_maskd.yaml"), [f"method.options.{option}={json.dumps(value)}"])


def test_align_none_needs_equal_channels():
    with pytest.raises(ValueError, match=r"level 'p3'.*align='none'.*method.options.align=conv"):
        build("maskd", teacher_channels=T_CH, student_channels=S_CH, align="none")
    method = build("maskd", teacher_channels=T_CH, align="none")
    assert all(method.level(n).align is None for n in T_CH)


# ------------------------------------------------------------------------------ tokens vs references
def test_tokens_masks_weights_and_stage1_feature_match_the_references():
    torch.manual_seed(0)
    module = ReceptiveTokens(8, 5, weight_mask=True).double()
    with torch.no_grad():
        module.tokens.mul_(50)
    feat = torch.randn(2, 8, 4, 3, dtype=torch.float64, requires_grad=True)
    masks = module.masks(feat)
    torch.testing.assert_close(masks, reference_masks(module.tokens, feat))
    c3, _, c1 = module.prob
    ref_w = reference_token_weights(c3.weight, c3.bias, c1.weight, c1.bias, feat)
    torch.testing.assert_close(module.token_weights(feat), ref_w)
    torch.testing.assert_close(ref_w.sum(1), torch.ones(2, dtype=torch.float64))
    out, dice = module.masked_feature(feat)
    ref_out = reference_masked_feature(reference_masks(module.tokens, feat), ref_w, feat)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dice, reference_dice(masks))
    # gradients into the tokens, the branch and the feature agree as well
    probe = torch.randn_like(out)
    params = [feat, module.tokens, c3.weight, c1.bias]
    got = torch.autograd.grad((out * probe).sum() + dice, params)
    want = torch.autograd.grad((ref_out * probe).sum() + reference_dice(reference_masks(module.tokens, feat)), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_authors_init():
    torch.manual_seed(0)
    module = ReceptiveTokens(64, 6, weight_mask=True)
    assert module.tokens.shape == (6, 64) and abs(float(module.tokens.detach().std()) - 0.01) < 0.002
    c3, pool, c1 = module.prob
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and c3.kernel_size == (3, 3) and c3.padding == (1, 1)
    assert abs(float(c3.weight.detach().std()) - (2 / (9 * 64)) ** 0.5) < 0.003
    assert float(c3.bias.detach().abs().max()) == 0
    assert abs(float(c1.weight.detach().std()) - (2 / 6) ** 0.5) < 0.1 and float(c1.bias.detach().abs().max()) == 0
    assert ReceptiveTokens(64, 6, weight_mask=False).prob is None


def test_dice_by_hand():
    # m1 = [1, 0], m2 = [1, 1]: <m1, m2> = 1, |m1|^2 = 1, |m2|^2 = 2 -> 2 / 3 for both ordered pairs
    masks = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(dice_coefficient(masks), torch.tensor(2 / 3, dtype=torch.float64))
    # three masks, two images: pairs (1,2) 2/3, (1,3) 0, (2,3) 2 * 1 / (2 + 1) = 2/3 -> mean 4/9; image 2 identical: 1
    three = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [[0.5, 0.5]] * 3], dtype=torch.float64)
    torch.testing.assert_close(dice_coefficient(three), torch.tensor((4 / 9 + 1) / 2, dtype=torch.float64))
    torch.testing.assert_close(dice_coefficient(three), reference_dice(three))
    assert float(dice_coefficient(torch.ones(1, 1, 4))) == 0.0  # one mask: no pair


@pytest.mark.parametrize("weight_mask,student_masks,align,eps", [
    (True, False, "conv", 0.0), (True, True, "conv", 0.0), (False, False, "none", 1e-5), (False, True, "conv", 1e-5),
])
def test_matches_the_line_by_line_reference_values_and_gradients(weight_mask, student_masks, align, eps):
    student_channels = T_CH if align == "none" else S_CH
    torch.manual_seed(0)
    method = build("maskd", teacher_channels=T_CH, student_channels=student_channels, weight_mask=weight_mask,
                   custom_mask=True, custom_mask_warmup=0 if student_masks else 10, align=align, norm_eps=eps,
                   weight=3.0)
    randomise_tokens(method)
    teacher, student = make_feats(student_channels=student_channels)
    losses = method(teacher, student)
    assert set(losses) == {"p3.maskd", "p4.maskd"} and all(v.dtype == torch.float64 for v in losses.values())
    total = sum(losses.values())
    expected = reference_method_loss(method, teacher, student, student_masks)
    torch.testing.assert_close(total, expected)
    params = [student["p3"], student["p4"]] + [p for p in method.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert method.statistics()["p3.student_masks_on"] == float(student_masks)


def test_level_loss_equals_the_reference_on_its_own():
    gen = torch.Generator().manual_seed(5)
    masks = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 3, generator=gen, dtype=torch.float64).softmax(1)
    s, t = (torch.randn(2, 7, 4, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    for w in (weights, None):
        torch.testing.assert_close(maskd_level_loss(masks, w, s, t, 1e-5), reference_maskd_loss(masks, w, s, t, 1e-5))


def test_a_mask_saturated_to_zero_gives_zero_loss_not_nan():
    """Large raw features saturate a token's sigmoid to exactly 0 at every position (the built-in
    study's scratch teacher: P7 at rms ~800); the authors' 0/0 would be NaN, ours is 0 for that token."""
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    masks[:, 1] = 0.0  # token 1 selects nothing in either image
    weights = torch.rand(2, 3, generator=gen, dtype=torch.float64).softmax(1)
    s = torch.randn(2, 7, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 4, 5, generator=gen, dtype=torch.float64)
    for w in (weights, None):
        loss = maskd_level_loss(masks, w, s, t)
        torch.testing.assert_close(loss, reference_maskd_loss(masks, w, s, t))
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        keep = [0, 2]  # the same as the loss over the other tokens with token 1's term set to 0
        per_token = [maskd_level_loss(masks[:, i:i + 1], None, s, t) for i in keep]
        if w is None:
            torch.testing.assert_close(loss, sum(per_token) / 3)
    # through sigmoid: a token whose logits are all below -100 in fp32 gives exactly 0 masks
    tokens = ReceptiveTokens(4, 2, weight_mask=False)
    with torch.no_grad():
        tokens.tokens.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    feat = torch.zeros(1, 4, 3, 3)
    feat[:, 0] = 800.0
    masks = tokens.masks(feat)
    assert masks[0, 1].eq(0).all()
    assert torch.isfinite(maskd_level_loss(masks, None, torch.randn(1, 4, 3, 3), feat))


def test_student_is_resized_to_the_teacher_grid_and_fp32_under_half_inputs():
    method = build("maskd", teacher_channels={"p3": 8}, student_channels={"p3": 4})
    teacher = torch.randn(2, 8, 6, 5)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = method({"p3": teacher}, {"p3": student})["p3.maskd"]
    resized = F.interpolate(student, size=(6, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, method({"p3": teacher}, {"p3": resized})["p3.maskd"])
    half = method({"p3": teacher.bfloat16()}, {"p3": student.bfloat16()})["p3.maskd"]
    assert half.dtype == torch.float32 and torch.isfinite(half)


# ------------------------------------------------------------------------------ switches
def test_frozen_tokens_receive_no_gradient_and_stay_out_of_the_optimizer():
    from acamkd.engine.schedule import build_optimizer

    method = build("maskd", teacher_channels=T_CH, student_channels=S_CH, custom_mask_warmup=0)
    randomise_tokens(method)
    frozen = {n: p.detach().clone() for n, p in method.named_parameters() if ".tokens." in n}
    assert frozen and all(not p.requires_grad for n, p in method.named_parameters() if ".tokens." in n)
    teacher, student = make_feats(dtype=torch.float32)
    sum(method(teacher, student).values()).backward()
    for name, p in method.named_parameters():
        if ".tokens." in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name  # the align convs train
    optimizer = build_optimizer(method.parameters(), "sgd", 0.1, weight_decay=1e-4)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in held for n, p in method.named_parameters() if ".tokens." in n)
    optimizer.step()
    for name, p in method.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_student_masks_join_after_the_warmup_counted_in_optimizer_steps():
    method = build("maskd", teacher_channels=T_CH, student_channels=S_CH, custom_mask_warmup=2)
    randomise_tokens(method)
    teacher, student = make_feats()
    for step in range(4):
        on = step >= 2
        assert method.step == step and method.student_masks_on() is on
        torch.testing.assert_close(sum(method(teacher, student).values()),
                                   reference_method_loss(method, teacher, student, student_masks=on))
        assert method.statistics()["p4.student_masks_on"] == float(on)
        method.optimizer_stepped()
    off = build("maskd", teacher_channels=T_CH, student_channels=S_CH, custom_mask=False, custom_mask_warmup=0)
    off.set_step(10 ** 6)
    assert not off.student_masks_on()
    # the count is part of the state dict: a resumed run continues it
    other = build("maskd", teacher_channels=T_CH, student_channels=S_CH, custom_mask_warmup=2)
    other.load_state_dict(method.state_dict())
    assert other.step == 4 and other.student_masks_on()
    with pytest.raises(OptionError, match="step"):
        method.set_step(-1)


def test_the_engine_step_tells_the_method():
    from acamkd.engine.step import TrainingStep

    method = build("maskd", teacher_channels=T_CH, student_channels=S_CH)
    trained = nn.Module()
    trained.method = method
    trained.student = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(trained.student.parameters(), lr=0.1)
    step = TrainingStep(None, trained, None, None, optimizer, device="cpu")
    step.optimizer_step()
    step.optimizer_step()
    assert method.step == 2


def test_inspect_gives_masks_that_viz_draws():
    from acamkd.viz.mask_tensors import masks_of, probe_masks

    method = build("maskd", teacher_channels=T_CH, student_channels=S_CH, custom_mask_warmup=0)
    teacher, student = make_feats(dtype=torch.float32)
    out = method.inspect(teacher, student)
    assert set(out) == set(T_CH)
    drawn = masks_of(out["p3"], GRIDS["p3"])
    assert [(m.name, m.kind, tuple(m.values.shape)) for m in drawn] == [
        ("teacher_masks", "spatial", (6, 6, 5)), ("student_masks", "spatial", (6, 6, 5)),
        ("applied_masks", "spatial", (6, 6, 5))]
    assert out["p3"]["token_weights"].shape == (2, 6)
    assert probe_masks("maskd")  # `acamkd viz masks` accepts the method


# ------------------------------------------------------------------------------ token files
def _write_tokens(path, channels=T_CH, num_tokens=6, weight_mask=True, seed=7):
    torch.manual_seed(seed)
    tokens = {n: ReceptiveTokens(c, num_tokens, weight_mask) for n, c in channels.items()}
    write_token_file(str(path), tokens, {"key": "test"})
    return tokens


def test_token_file_round_trip_loads_frozen_tokens(tmp_path):
    path = tmp_path / "tokens.safetensors"
    tokens = _write_tokens(path)
    method = build("maskd", teacher_channels=T_CH, student_channels=S_CH, token_file=str(path))
    for name, module in tokens.items():
        loaded = method.level(name).tokens
        assert torch.equal(loaded.tokens, module.tokens) and not loaded.tokens.requires_grad
        assert torch.equal(loaded.prob[0].weight, module.prob[0].weight)
    tensors, meta = load_token_file(str(path))
    assert meta["levels"] == ["p3", "p4"] and meta["num_tokens"] == 6 and meta["key"] == "test"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # the atomic write left nothing


def test_token_file_errors_name_the_option_and_what_to_do(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match=r"method.options.token_file: no file.*acamkd maskd-tokens CONFIG"):
        build("maskd", teacher_channels=T_CH, student_channels=S_CH, token_file=str(missing))
    path = tmp_path / "t.safetensors"
    _write_tokens(path)
    with pytest.raises(ValueError, match=r"6 tokens per level, method.options.num_tokens is 4"):
        build("maskd", teacher_channels=T_CH, student_channels=S_CH, token_file=str(path), num_tokens=4)
    with pytest.raises(ValueError, match=r"weight_mask=true.*weight_mask is false"):
        build("maskd", teacher_channels=T_CH, student_channels=S_CH, token_file=str(path), weight_mask=False)
    with pytest.raises(ValueError, match=r"levels \['p5'\] are not among them"):
        build("maskd", teacher_channels={"p3": 8, "p5": 8}, token_file=str(path))
    with pytest.raises(ValueError, match=r"level 'p4' has 8 channels in the file, the teacher's tap has 16"):
        build("maskd", teacher_channels={"p3": 8, "p4": 16}, token_file=str(path))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a MasKD token file"):
        build("maskd", teacher_channels=T_CH, token_file=str(other))


# ------------------------------------------------------------------------------ stage 1 parts
def test_masking_hooks_replace_dict_outputs_and_record_dice():
    class Neck(nn.Module):
        def forward(self, x):
            return collections.OrderedDict([("0", x), ("pool", x[:, :, ::2, ::2])])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.neck = Neck()

        def forward(self, x):
            out = self.neck(x)
            return out["0"].sum() + out["pool"].sum()

    torch.manual_seed(0)
    model = Model()
    tokens = {"p3": ReceptiveTokens(4, 3), "p4": ReceptiveTokens(4, 3)}
    x = torch.randn(2, 4, 6, 6)
    seen = {}
    model.neck.register_forward_hook(lambda m, a, out: seen.update(out))  # runs before ours: the original output
    with MaskingHooks(model, {"neck": "neck"}, {"neck.0": "p3", "neck.pool": "p4"}, tokens) as hooks:
        y = model(x)
        dice = hooks.take_dice()
    with torch.no_grad():
        expected = tokens["p3"].masked_feature(x)[0].sum() + tokens["p4"].masked_feature(x[:, :, ::2, ::2])[0].sum()
    torch.testing.assert_close(y, expected)
    assert set(dice) == {"p3", "p4"} and torch.equal(seen["0"], x)
    y.backward()
    assert tokens["p3"].tokens.grad is not None
    assert torch.equal(model(x), x.sum() + x[:, :, ::2, ::2].sum())  # hooks removed
    with MaskingHooks(model, {"neck": "neck"}, {"neck.0": "p3"}, {"p3": tokens["p3"], "p9": tokens["p4"]}) as hooks:
        model(x)
        with pytest.raises(RuntimeError, match=r"levels \['p9'\]"):
            hooks.take_dice()


def test_stage1_learning_rate_schedules():
    assert token_lr_factor(0, 100, "cosine", 0.01) == pytest.approx(1.0)
    assert token_lr_factor(100, 100, "cosine", 0.01) == pytest.approx(1e-4)  # min_lr 1e-6 / lr 0.01
    assert token_lr_factor(50, 100, "cosine", 0.01) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert token_lr_factor(50, 100, "poly", 0.1) == pytest.approx(0.5 ** 0.9)


# ------------------------------------------------------------------------------ end to end
def tiny(root, out, iterations=3):
    return [f"data.root={root}", "data.shapes.train=4", "data.shapes.val=2", "data.shapes.size=[64,96]",
            "data.min_size=64", "data.max_size=96", "data.batch_size=2", "data.workers=0",
            "train.epochs=null", f"train.iterations={iterations}", "train.warmup_iters=1", "train.log_every=1",
            "train.val_every=0", "train.checkpoint_every=100", "train.eval_teacher_first=false",
            f"train.output_dir={out}"]


def _random_teacher(cfg, path):
    """A randomly initialised teacher's state dict (stage 1 needs a loadable teacher, not a good one)."""
    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_task

    task = build_task(cfg, DistInfo())
    train_set, _ = task.datasets()
    model = task.build_model(dataclasses.replace(cfg.teacher, checkpoint=None), task.model_classes(train_set),
                             "teacher")
    torch.save(model.state_dict(), path)


@pytest.mark.parametrize("config,extra", [
    ("shapes_det_maskd.yaml", ["teacher.backbone=resnet18", "method.options.custom_mask_warmup=1", "train.steps=[2]"]),
    ("shapes_seg_maskd.yaml", ["data.crop=[48,64]", "student.arch=pspnet", "student.backbone=resnet18"]),
], ids=["detection", "segmentation"])
def test_stage1_then_distill_end_to_end(tmp_path, monkeypatch, config, extra):
    from acamkd.cli import main
    from acamkd.engine.checkpoint import load_checkpoint
    from acamkd.engine.run import distill

    monkeypatch.setenv("ACAMKD_TRACEBACK", "1")  # a failing command raises here, with its traceback
    teacher = tmp_path / "teacher.pt"
    args = [*tiny(tmp_path / "shapes", tmp_path / "run"), *extra, f"teacher.checkpoint={teacher}",
            "method.options.token_iterations=2"]
    cfg = load_config(os.path.join(DEMO, config), args)
    _random_teacher(cfg, teacher)
    # stage 1 through the CLI subcommand
    out = tmp_path / "tokens.safetensors"
    assert main(["maskd-tokens", os.path.join(DEMO, config), *args, "--out", str(out)]) == 0
    tensors, meta = load_token_file(str(out))
    levels = ["logits"] if "seg" in config else ["p3", "p4", "p5", "p6", "p7"]
    assert meta["levels"] == levels and meta["iterations"] == "2"
    assert meta["key"] == stage1_key(cfg, cfg_options(cfg), meta["teacher_sha256"])
    # stage 2 from that file: the tokens are the file's, frozen; the step count reached the method
    cfg2 = load_config(os.path.join(DEMO, config), [*args, f"method.options.token_file={out}"])
    assert "student" in distill(cfg2)
    state = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert state["method"]["_extra_state"] == {"step": 3}
    key = f"levels.{levels[0]}.tokens.tokens"
    assert torch.equal(state["method"][key], tensors[f"{levels[0]}.tokens"])
    if "seg" in config:
        return  # the same code path as detection from here on
    # `acamkd viz masks` draws the run's masks
    from acamkd.viz.masks import mask_figures

    written = mask_figures(cfg2, str(tmp_path / "run" / "last.pt"), images=1, level="p4", device="cpu")
    assert len(written) == 1 and os.path.getsize(written[0]) > 0
    # token_file=auto: stage 1 into the run folder, then reused by a second run there
    auto = load_config(os.path.join(DEMO, config), [*args[:-1], "method.options.token_iterations=1",
                                                    "train.iterations=1", "train.steps=[]",
                                                    f"train.output_dir={tmp_path / 'auto'}"])
    distill(auto)
    learnt = tmp_path / "auto" / TOKEN_FILE_NAME
    stamp = os.stat(learnt).st_mtime_ns
    distill(auto, overwrite=True)
    assert os.stat(learnt).st_mtime_ns == stamp  # cached: not learnt again


def cfg_options(cfg):
    return parse_options("maskd", cfg.method.options)


def test_a_missing_token_file_refuses_distill_naming_the_option_and_command(tmp_path):
    from acamkd.engine.run import distill

    cfg = load_config(os.path.join(DEMO, "shapes_det_maskd.yaml"),
                      [*tiny(tmp_path / "shapes", tmp_path / "run"), "train.steps=[2]",
                       f"teacher.checkpoint={tmp_path / 't.pt'}",
                       f"method.options.token_file={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(FileNotFoundError, match=r"method.options.token_file: no file.*acamkd maskd-tokens CONFIG"):
        distill(cfg)


def test_paper_config_loads():
    cfg = load_config(os.path.join(CONFIGS, "det", "retinanet_r101_r50_maskd.yaml"), [])
    assert cfg.method.name == "maskd" and cfg.method.options["weight"] == 7.0
    assert cfg.method.options["custom_mask_warmup"] == 7000 and cfg.train.lr == 0.02


def test_auto_tokens_under_torchrun_are_refused_with_the_command_and_a_short_warmup_warns(tmp_path, caplog):
    """Under torchrun ``token_file=auto`` never learns (the waiting ranks would outlast the NCCL
    timeout): a missing file names the command to run first. A warm-up as long as the run warns."""
    from types import SimpleNamespace

    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.maskd_tokens import resolve_token_file

    cfg = load_config(os.path.join(DEMO, "shapes_det_maskd.yaml"),
                      [*tiny(tmp_path / "shapes", tmp_path / "run"), "train.steps=[2]"])
    assert cfg.method.options["custom_mask_warmup"] == 25 and cfg.train.iterations == 3
    task = SimpleNamespace(info=DistInfo(rank=1, world_size=2))
    with caplog.at_level("WARNING", logger="acamkd"):
        with pytest.raises(RuntimeError, match=r"does not run under torchrun.*acamkd maskd-tokens CONFIG .*--out "
                                               + str(tmp_path / "run" / "maskd_tokens.safetensors")):
            resolve_token_file(cfg, task, train_set=[None] * 4)
    assert "custom_mask_warmup=25 >= the run's 3 optimizer steps" in caplog.text


def test_damaged_token_file_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    from acamkd.methods.maskd import TOKEN_FILE_FORMAT

    path = tmp_path / "t.safetensors"
    save_file({"p3.tokens": torch.zeros(2, 4)}, str(path), metadata={"format": TOKEN_FILE_FORMAT, "levels": "[p3"})
    with pytest.raises(ValueError, match=r"method.options.token_file: .* damaged or missing metadata"):
        load_token_file(str(path))
