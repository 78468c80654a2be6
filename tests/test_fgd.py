"""``fgd`` (focal and global distillation, yzd-v/FGD's ``FeatureLoss``) against a plain
line-by-line reference, and its masks on hand-made boxes with exact expected values.

The contract (level names, errors, state dict, inspect, options) is covered by
``tests/test_method_contract.py``, parametrised over every registered method.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from acamkd.methods import available, build, options_class, parse_options
from acamkd.methods.base import OptionError
from acamkd.methods.batch import DistillBatch
from acamkd.methods.fgd import FGD, PUBLISHED_CONSTANTS, FGDOptions, fgd_masks

WEIGHTS = ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd")
KINDS = ("fg", "bg", "attention", "global")


# ------------------------------------------------------------------------------- the reference
def reference_masks(boxes, image_sizes, grid, frame="image_shape", stride=None):
    """The authors' masks with loops: per box, scale to the grid, floor/ceil, fill the inclusive
    cell range (cut to the grid) with max(current, 1 / cells), then 1 / N_bg on the empty cells."""
    H, W = grid
    fgs, bgs = [], []
    for b, (h, w) in zip(boxes, image_sizes):
        fg = [[0.0] * W for _ in range(H)]
        for x1, y1, x2, y2 in b.tolist():
            if frame == "image_shape":
                x1, x2, y1, y2 = x1 / w * W, x2 / w * W, y1 / h * H, y2 / h * H
            else:
                x1, x2, y1, y2 = x1 / stride, x2 / stride, y1 / stride, y2 / stride
            wmin, wmax, hmin, hmax = math.floor(x1), math.ceil(x2), math.floor(y1), math.ceil(y2)
            area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))
            for y in range(max(hmin, 0), min(hmax, H - 1) + 1):
                for x in range(max(wmin, 0), min(wmax, W - 1) + 1):
                    fg[y][x] = max(fg[y][x], area)
        empty = sum(1 for row in fg for v in row if v == 0)
        bg = [[(1.0 / empty if v == 0 else 0.0) for v in row] for row in fg]
        fgs.append(fg)
        bgs.append(bg)
    return torch.tensor(fgs, dtype=torch.float64), torch.tensor(bgs, dtype=torch.float64)


def reference_attention(feat, temp):
    """Spatial ``H W exp(m_p / T) / sum_q exp(m_q / T)``, ``m_p`` the mean over channels of |F| at
    p; channel ``C exp(k_c / T) / sum exp(...)``, ``k_c`` the mean over positions of |F| in c."""
    N, C, H, W = feat.shape
    spatial, channel = [], []
    for n in range(N):
        m = [[sum(feat[n, c, y, x].abs() for c in range(C)) / C for x in range(W)] for y in range(H)]
        z = sum(torch.exp(m[y][x] / temp) for y in range(H) for x in range(W))
        spatial.append([[H * W * torch.exp(m[y][x] / temp) / z for x in range(W)] for y in range(H)])
        k = [sum(feat[n, c, y, x].abs() for y in range(H) for x in range(W)) / (H * W) for c in range(C)]
        zc = sum(torch.exp(v / temp) for v in k)
        channel.append([C * torch.exp(v / temp) / zc for v in k])
    return spatial, channel


def reference_context_add(feat, p, side):
    """The global-context block with loops: softmax over positions of ``conv_mask``, the weighted
    sum of F, then conv -> LayerNorm (biased variance, eps 1e-5) -> ReLU -> conv; ``(N, C)``."""
    N, C, H, W = feat.shape
    hidden = C // 2
    pre = f"global_{side}."
    out = []
    for n in range(N):
        logits = [[p[pre + "conv_mask.bias"][0] + sum(p[pre + "conv_mask.weight"][0, c, 0, 0] * feat[n, c, y, x]
                                                    for c in range(C)) for x in range(W)] for y in range(H)]
        z = sum(torch.exp(logits[y][x]) for y in range(H) for x in range(W))
        context = [sum(torch.exp(logits[y][x]) / z * feat[n, c, y, x] for y in range(H) for x in range(W))
                   for c in range(C)]
        h = [p[pre + "add_in.bias"][o] + sum(p[pre + "add_in.weight"][o, c, 0, 0] * context[c] for c in range(C))
             for o in range(hidden)]
        mu = sum(h) / hidden
        var = sum((v - mu) ** 2 for v in h) / hidden
        r = [torch.relu((h[o] - mu) / torch.sqrt(var + 1e-5) * p[pre + "norm.weight"][o, 0, 0]
                        + p[pre + "norm.bias"][o, 0, 0]) for o in range(hidden)]
        out.append([p[pre + "add_out.bias"][c]
                    + sum(p[pre + "add_out.weight"][c, o, 0, 0] * r[o] for o in range(hidden)) for c in range(C)])
    return out


def reference_fgd(teacher, student, p, mask_fg, mask_bg, opts):
    """The four weighted terms of one level, every sum an explicit loop over (n, c, y, x)."""
    N, C_s, H, W = student.shape
    C = teacher.shape[1]
    if "align.weight" in p:
        aligned = torch.stack([torch.stack([torch.stack([torch.stack([
            p["align.bias"][o] + sum(p["align.weight"][o, k, 0, 0] * student[n, k, y, x] for k in range(C_s))
            for x in range(W)]) for y in range(H)]) for o in range(C)]) for n in range(N)])
    else:
        aligned = student
    st, ct = reference_attention(teacher, opts.temp)
    ss, cs = reference_attention(aligned, opts.temp)
    add_s, add_t = reference_context_add(aligned, p, "student"), reference_context_add(teacher, p, "teacher")
    fg = bg = att = glob = teacher.new_zeros(())
    for n in range(N):
        for c in range(C):
            att = att + (cs[n][c] - ct[n][c]).abs()
            for y in range(H):
                for x in range(W):
                    d2 = (aligned[n, c, y, x] - teacher[n, c, y, x]) ** 2
                    fg = fg + mask_fg[n, y, x] * st[n][y][x] * ct[n][c] * d2
                    bg = bg + mask_bg[n, y, x] * st[n][y][x] * ct[n][c] * d2
                    glob = glob + ((aligned[n, c, y, x] + add_s[n][c]) - (teacher[n, c, y, x] + add_t[n][c])) ** 2
        for y in range(H):
            for x in range(W):
                att = att + (ss[n][y][x] - st[n][y][x]).abs()
    return {"fg": opts.alpha_fgd * fg / N, "bg": opts.beta_fgd * bg / N, "attention": opts.gamma_fgd * att / N,
            "global": opts.lambda_fgd * glob / N}


# -------------------------------------------------------------------------------------- helpers
def make_batch(dtype=torch.float32):
    # input 48 x 64 (strides 8 / 16: grids 6 x 8 / 3 x 4); image 1 is smaller than the padded input
    return DistillBatch(input_size=(48, 64), image_sizes=[(48, 64), (40, 48)],
                        boxes=[torch.tensor([[3.0, 5.0, 20.0, 30.0], [30.0, 10.0, 62.0, 44.0]], dtype=dtype),
                               torch.tensor([[0.0, 0.0, 12.0, 10.0]], dtype=dtype)],
                        labels=[torch.tensor([1, 2]), torch.tensor([3])])


def make_feats(teacher_channels, student_channels, grids, batch=2, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    teacher = {n: torch.randn(batch, c, *grids[n], generator=gen, dtype=dtype) for n, c in teacher_channels.items()}
    student = {n: torch.randn(batch, c, *grids[n], generator=gen, dtype=dtype).requires_grad_(True)
               for n, c in student_channels.items()}
    return teacher, student


def randomise_context_blocks(method, seed=3):
    """The authors zero the last conv: give every parameter a value so the global term and its
    gradients are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in method.named_parameters():
            if "global_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen, dtype=param.dtype) + ("norm.weight" in name))


# ---------------------------------------------------------------------------------------- tests
def test_registered_with_the_authors_constants():
    assert "fgd" in available() and options_class("fgd") is FGDOptions
    d = FGDOptions()
    # yzd-v/FGD @ c03a6cf configs/distillers/fgd/fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py
    assert (d.temp, d.alpha_fgd, d.beta_fgd, d.gamma_fgd, d.lambda_fgd) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert {k: getattr(d, k) for k in ("temp", *WEIGHTS)} == PUBLISHED_CONSTANTS["retinanet"]
    assert PUBLISHED_CONSTANTS["fasterrcnn"] == {"temp": 0.5, "alpha_fgd": 5e-5, "beta_fgd": 2.5e-5,
                                                 "gamma_fgd": 5e-5, "lambda_fgd": 5e-7}
    assert PUBLISHED_CONSTANTS["fcos"] == {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4,
                                           "gamma_fgd": 8e-4, "lambda_fgd": 8e-6}
    assert d.box_frame == "image_shape"
    assert parse_options("fgd", PUBLISHED_CONSTANTS["fcos"]).temp == 0.8
    assert isinstance(build("fgd", teacher_channels={"p3": 4}), FGD)


def test_masks_on_hand_made_boxes():
    # grid 4 x 5, boxes in cell units (x: columns, y: rows)
    boxes = [
        torch.tensor([[1.0, 1.0, 2.0, 2.0],      # integer corners: cells 1..2 x 1..2 (ceil(2) = 2 included) -> 1/4
                      [0.5, 2.5, 3.2, 3.9]]),    # crosses cell borders: rows 2..4 (cut at 3), cols 0..4 -> 1/(3*5)
        torch.zeros(0, 4),                       # no boxes: background everywhere, 1/20
        torch.tensor([[0.0, 0.0, 5.0, 4.0]]),    # the whole grid (and beyond): 1/(5*6) everywhere, no background
    ]
    fg, bg = fgd_masks(boxes, (4, 5), torch.float64)
    q, f = 1 / 4, 1 / 15
    expected_fg0 = torch.tensor([[0, 0, 0, 0, 0],
                                 [0, q, q, 0, 0],
                                 [f, q, q, f, f],  # overlap: the max, 1/4 (the smaller box wins)
                                 [f, f, f, f, f]], dtype=torch.float64)
    torch.testing.assert_close(fg[0], expected_fg0, rtol=0, atol=0)
    empty = (expected_fg0 == 0).to(torch.float64)
    torch.testing.assert_close(bg[0], empty / 8, rtol=0, atol=0)  # eight uncovered cells
    torch.testing.assert_close(fg[1], torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(bg[1], torch.full((4, 5), 1 / 20, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(fg[2], torch.full((4, 5), 1 / 30, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(bg[2], torch.zeros(4, 5, dtype=torch.float64), rtol=0, atol=0)
    ref_fg, ref_bg = reference_masks(boxes, [(4, 5)] * 3, (4, 5))  # image_shape == grid: the identity map
    torch.testing.assert_close(fg, ref_fg, rtol=0, atol=0)
    torch.testing.assert_close(bg, ref_bg, rtol=0, atol=0)
    assert bg[0].sum().item() == pytest.approx(1.0) and bg[1].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("frame", ["image_shape", "stride"])
def test_boxes_are_mapped_as_the_option_says(frame):
    method = FGD({"p3": 4, "p4": 4}, box_frame=frame).double()
    teacher, student = make_feats({"p3": 4, "p4": 4}, {"p3": 4, "p4": 4}, {"p3": (6, 8), "p4": (3, 4)})
    batch = make_batch()
    out = method.inspect(teacher, student, batch=batch)
    for name, (grid, stride) in {"p3": ((6, 8), 8), "p4": ((3, 4), 16)}.items():
        fg, bg = reference_masks(batch.boxes, batch.image_sizes, grid, frame, stride)
        torch.testing.assert_close(out[name]["mask_fg"], fg, rtol=1e-15, atol=0)
        torch.testing.assert_close(out[name]["mask_bg"], bg, rtol=1e-15, atol=0)
    # image 1 (40 x 48 in a 48 x 64 input), box (0, 0, 12, 10), by hand. p3: authors x / 48 * 8 = 0..2,
    # y / 40 * 6 = 0..1.5; stride x / 8 = 0..1.5, y / 8 = 0..1.25: cols 0..2, rows 0..2 either way -> 1/9.
    fg1 = out["p3"]["mask_fg"][1]
    assert fg1[:3, :3].eq(1 / 9).all() and fg1.count_nonzero() == 9
    # p4: authors x / 48 * 4 = 0..1, y / 40 * 3 = 0..0.75; stride 0..0.75, 0..0.625: cols 0..1, rows 0..1 -> 1/4
    fg1_p4 = out["p4"]["mask_fg"][1]
    assert fg1_p4[:2, :2].eq(1 / 4).all() and fg1_p4.count_nonzero() == 4
    # image 0 fills the input: both frames agree there
    other = FGD({"p3": 4, "p4": 4}, box_frame="stride" if frame == "image_shape" else "image_shape").double()
    torch.testing.assert_close(other.inspect(teacher, student, batch=batch)["p3"]["mask_fg"][0],
                               out["p3"]["mask_fg"][0], rtol=0, atol=0)


def test_the_frames_differ_on_a_padded_image():
    # image 1 is 24 x 32 in a 48 x 64 input: the authors' map stretches its boxes to the whole grid
    batch = DistillBatch(input_size=(48, 64), image_sizes=[(48, 64), (24, 32)],
                         boxes=[torch.zeros(0, 4), torch.tensor([[16.0, 12.0, 32.0, 24.0]])])
    teacher, student = make_feats({"p": 4}, {"p": 4}, {"p": (6, 8)})
    authors = FGD({"p": 4}).double().inspect(teacher, student, batch=batch)["p"]["mask_fg"][1]
    stride = FGD({"p": 4}, box_frame="stride").double().inspect(teacher, student, batch=batch)["p"]["mask_fg"][1]
    # authors: x 16/32*8 = 4 .. 8, y 12/24*6 = 3 .. 6 -> cols 4..8 (cut at 7), rows 3..6 (cut at 5): 1/(4*5)
    assert authors[3:, 4:].eq(1 / 20).all() and authors.count_nonzero() == 12
    # stride 8: x 2 .. 4, y 1.5 .. 3 -> cols 2..4, rows 1..3: 1/(3*3)
    assert stride[1:4, 2:5].eq(1 / 9).all() and stride.count_nonzero() == 9


@pytest.mark.parametrize("channels", [{"p3": 3, "p4": 4}, {"p3": 4, "p4": 4}])  # aligned / not (identity)
@pytest.mark.parametrize("constants", ["retinanet", "fcos"])
def test_matches_the_line_by_line_reference_values_and_gradients(channels, constants):
    teacher_channels = {"p3": 4, "p4": 4}
    grids = {"p3": (3, 4), "p4": (2, 2)}
    method = FGD(teacher_channels, channels, **PUBLISHED_CONSTANTS[constants]).double()
    assert (method.level("p3").align is None) == (channels["p3"] == 4)
    randomise_context_blocks(method)
    teacher, student = make_feats(teacher_channels, channels, grids)
    batch = DistillBatch(input_size=(24, 32), image_sizes=[(24, 32), (20, 28)],
                         boxes=[torch.tensor([[3.0, 5.0, 13.0, 11.0]], dtype=torch.float64),
                                torch.tensor([[0.0, 0.0, 9.0, 7.0], [10.0, 12.0, 27.0, 19.0]], dtype=torch.float64)])
    losses = method(teacher, student, batch=batch)
    assert sorted(losses) == sorted(f"{n}.{k}" for n in grids for k in KINDS)
    sum(losses.values()).backward()
    opts = method.options
    for name, grid in grids.items():
        level = method.level(name)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in level.named_parameters()}
        s = student[name].detach().clone().requires_grad_(True)
        mask_fg, mask_bg = reference_masks(batch.boxes, batch.image_sizes, grid)
        ref = reference_fgd(teacher[name], s, params, mask_fg, mask_bg, opts)
        sum(ref.values()).backward()
        for kind in KINDS:
            assert losses[f"{name}.{kind}"].dtype == torch.float64
            torch.testing.assert_close(losses[f"{name}.{kind}"], ref[kind], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(student[name].grad, s.grad, rtol=1e-9, atol=1e-13)
        for pname, p in level.named_parameters():
            torch.testing.assert_close(p.grad, params[pname].grad, rtol=1e-9, atol=1e-13, msg=f"{name}.{pname}")
    stats = method.statistics()  # unweighted terms
    weight = {"fg": opts.alpha_fgd, "bg": opts.beta_fgd, "attention": opts.gamma_fgd, "global": opts.lambda_fgd}
    for key, value in losses.items():
        assert stats[key] == pytest.approx(value.item() / weight[key.rpartition(".")[2]], rel=1e-12)


def test_the_authors_init_and_channel_alignment():
    method = FGD({"a": 8, "b": 8}, {"a": 8, "b": 6})
    assert method.level("a").align is None  # equal channels: identity (the authors' align = None)
    align = method.level("b").align
    assert isinstance(align, torch.nn.Conv2d) and align.weight.shape == (8, 6, 1, 1) and align.bias is not None
    for name in ("a", "b"):
        for side in ("global_student", "global_teacher"):
            block = getattr(method.level(name), side)
            assert block.add_out.weight.abs().sum() == 0 and block.add_out.bias.abs().sum() == 0  # last_zero_init
            assert block.conv_mask.bias.abs().sum() == 0 and block.conv_mask.weight.abs().sum() > 0
            assert block.add_in.weight.shape == (4, 8, 1, 1) and block.norm.normalized_shape == (4, 1, 1)
    # at init the context adds 0: the global term is the plain summed squared difference / N
    teacher, student = make_feats({"a": 8}, {"a": 8}, {"a": (3, 4)})
    single = FGD({"a": 8}).double()
    batch = DistillBatch(input_size=(24, 32), image_sizes=[(24, 32)] * 2, boxes=[torch.zeros(0, 4)] * 2)
    single(teacher, student, batch=batch)
    expected = (student["a"].detach() - teacher["a"]).square().sum() / 2
    assert single.statistics()["a.global"] == pytest.approx(expected.item(), rel=1e-12)


def test_no_boxes_means_no_foreground_and_uniform_background():
    method = FGD({"p": 4}).double()
    teacher, student = make_feats({"p": 4}, {"p": 4}, {"p": (3, 4)})
    batch = DistillBatch(input_size=(24, 32), image_sizes=[(24, 32)] * 2, boxes=[torch.zeros(0, 4)] * 2)
    losses = method(teacher, student, batch=batch)
    assert losses["p.fg"].item() == 0
    out = method.inspect(teacher, student, batch=batch)["p"]
    torch.testing.assert_close(out["mask_bg"], torch.full((2, 3, 4), 1 / 12, dtype=torch.float64))
    # attentions average 1 (the H W and C scaling)
    torch.testing.assert_close(out["spatial_attention_teacher"].mean((1, 2)), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out["channel_attention_student"].mean(1), torch.ones(2, dtype=torch.float64))


def test_the_student_is_resized_to_the_teacher_grid_first():
    method = FGD({"p": 4}).double()
    randomise_context_blocks(method)
    teacher, student = make_feats({"p": 4}, {"p": 4}, {"p": (4, 6)})
    small = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    batch = DistillBatch(input_size=(32, 48), image_sizes=[(32, 48)] * 2,
                         boxes=[torch.tensor([[4.0, 4.0, 20.0, 12.0]])] * 2)
    got = method(teacher, {"p": small}, batch=batch)
    resized = F.interpolate(small, size=(4, 6), mode="bilinear", align_corners=False)
    expected = method(teacher, {"p": resized}, batch=batch)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-14, atol=0)


def test_refuses_to_run_without_boxes_naming_the_level():
    method = FGD({"p3": 4, "p4": 4})
    teacher, student = make_feats({"p3": 4, "p4": 4}, {"p3": 4, "p4": 4}, {"p3": (6, 8), "p4": (3, 4)},
                                  dtype=torch.float32)
    with pytest.raises(ValueError, match=r"FGD level 'p3': needs the ground-truth boxes, got batch=None"):
        method(teacher, student)
    segmentation = DistillBatch(input_size=(48, 64), image_sizes=[(48, 64)] * 2,
                                label_map=torch.zeros(2, 48, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"FGD level 'p3': the batch carries no boxes.*detection only"):
        method(teacher, student, batch=segmentation)
    with pytest.raises(TypeError, match=r"FGD level 'p3': batch must be a DistillBatch, got dict"):
        method(teacher, student, batch={"boxes": []})
    one = DistillBatch(input_size=(48, 64), image_sizes=[(48, 64)], boxes=[torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"FGD level 'p3': the batch has 1 images, the features 2"):
        method(teacher, student, batch=one)


@pytest.mark.parametrize("option,value", [("temp", 0.0), ("temp", -0.5), ("alpha_fgd", -1.0),
                                          ("lambda_fgd", float("inf")), ("box_frame", "pixels")])
def test_bad_options_are_named(option, value):
    with pytest.raises(OptionError, match=rf"^{option} "):
        FGDOptions(**{option: value})
    with pytest.raises(ValueError, match=rf"FGD level 'p3': {option} "):
        FGD({"p3": 4}, **{option: value})


def test_a_level_too_narrow_for_the_context_block_is_named():
    with pytest.raises(ValueError, match=r"FGD level 'p7': teacher_channels must be >= 2"):
        FGD({"p3": 4, "p7": 1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    torch.manual_seed(0)
    method = FGD({"p3": 4, "p4": 4}, {"p3": 3, "p4": 4})
    randomise_context_blocks(method)
    teacher, student = make_feats({"p3": 4, "p4": 4}, {"p3": 3, "p4": 4}, {"p3": (6, 8), "p4": (3, 4)}, dtype=dtype)
    batch = make_batch()
    got = method(teacher, student, batch=batch)
    up_t = {n: t.float() for n, t in teacher.items()}
    up_s = {n: s.detach().float() for n, s in student.items()}
    expected = method(up_t, up_s, batch=batch)
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-9)
    sum(got.values()).backward()
    assert all(s.grad is not None and s.grad.dtype == dtype and torch.isfinite(s.grad).all() for s in student.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast region: still fp32 math
        auto = method(up_t, up_s, batch=batch)
    for key in expected:
        assert auto[key].dtype == torch.float32
        torch.testing.assert_close(auto[key], expected[key], rtol=1e-6, atol=1e-9)
