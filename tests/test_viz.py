"""acamkd viz: history plots from a tiny run folder, mask pictures from a tiny distillation
checkpoint (files exist, decode, have the layout's pixel size), and methods without masks refused."""
import json
import os

import pytest
import torch
from PIL import Image

from acamkd.engine.run_log import RunLog
from acamkd.viz.figure import figure_pixels
from acamkd.viz.history import history_figures, load_run, run_labels
from acamkd.viz.mask_tensors import masks_of, probe_masks
from acamkd.viz.masks import NCOLS, PANEL_IN, TITLE_IN, NoMasksError, check_method_has_masks

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def png_size(path):
    with Image.open(path) as im:
        im.load()  # decodes the whole image
        return im.size


def write_run(folder, scale=1.0, nan_at=None):
    with RunLog(folder, tensorboard=False, progress=False) as log:
        for step in range(1, 5):
            record = {"task.classification": scale / step, "task.bbox_regression": 0.5 * scale,
                      "loss": 2.0 * scale, "lr": 0.01 * step,
                      "distill.p3.channel": 0.1, "distill.p4.channel": 0.2,
                      "distill.p3.spatial": 0.3, "distill.p4.spatial": 0.4,
                      "stats.p3.spatial_mask_mean": 0.5 / step, "stats.p4.spatial_mask_mean": 0.4,
                      "stats.p3.spatial_dice": 0.2, "stats.p4.spatial_dice": 0.3,
                      "stats.p3.participation": 1.0, "stats.p4.participation": 0.9}
            if step == nan_at:
                record["loss"] = float("nan")
            log.log(step, record)
        log.log(4, {"AP": 0.1 * scale, "AP50": 0.2, "APl": -1.0}, kind="val")


def test_history_writes_four_figures_with_the_layouts_size(tmp_path):
    write_run(tmp_path / "a" / "seed0")
    write_run(tmp_path / "b" / "seed0", scale=2.0, nan_at=3)
    (tmp_path / "b" / "seed0" / "metrics.jsonl").open("a").write('{"step": 5, "ki')  # a line being written
    written = history_figures([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"], tmp_path / "out")
    assert [os.path.basename(p) for p in written] == ["losses.png", "masks.png", "stats.png", "validation.png"]
    # losses: loss, 2 task losses, 2 distill kinds, lr = 6 panels, 4 per row -> 2 rows of 3.4 x 2.4 in
    assert png_size(written[0]) == figure_pixels(3.4 * 4, 2.4 * 2 + 0.6) == (1360, 540)
    # masks: 2 stats (rows) x 2 levels (columns), cells of 0.8 * 3.4 x 0.9 * 2.4 in
    assert png_size(written[1]) == figure_pixels(0.8 * 3.4 * 2, 0.9 * 2.4 * 2 + 0.6) == (544, 492)
    assert png_size(written[2]) == figure_pixels(0.8 * 3.4 * 2, 0.9 * 2.4 + 0.6) == (544, 276)
    # validation: AP, AP50 (APl is -1 at every evaluation: left out) -> 2 panels in one row
    assert png_size(written[3]) == figure_pixels(3.4 * 2, 2.4 + 0.6) == (680, 300)


def test_history_reads_numbers_and_names_runs_apart(tmp_path):
    write_run(tmp_path / "x" / "run", nan_at=2)
    run = load_run(tmp_path / "x" / "run")
    steps, values = run.train["loss"]
    assert steps == [1, 2, 3, 4] and values[0] == 2.0 and values[1] != values[1]  # "nan" read back as NaN
    assert run.val["AP"] == ([4], [0.1])
    assert run_labels(["/r/acam/seed0", "/r/mimic/seed0"]) == ["acam/seed0", "mimic/seed0"]
    assert run_labels(["/r/a", "/r/b"]) == ["a", "b"]


def test_history_errors_name_the_folder_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in .*empty"):
        (tmp_path / "empty").mkdir()
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        load_run(bad)


def test_plain_run_has_no_mask_figure_through_the_cli(tmp_path, capsys):
    from acamkd.cli import main

    with RunLog(tmp_path / "plain", tensorboard=False, progress=False) as log:
        log.log(1, {"task.ce": 1.0, "loss": 1.0, "lr": 0.1})
    assert main(["viz", "history", str(tmp_path / "plain"), "--out", str(tmp_path / "out")]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert [os.path.basename(p) for p in written] == ["losses.png"]
    assert png_size(written[0]) == figure_pixels(3.4 * 3, 2.4 + 0.6)  # loss, task.ce, lr in one row
    assert main(["viz", "history", str(tmp_path / "nowhere")]) == 1
    assert "run folder not found" in capsys.readouterr().err


def test_masks_are_found_by_name_and_shape():
    out = {"spatial_masks": torch.rand(2, 3, 4, 5), "fg_mask": torch.rand(2, 4, 5),
           "channel_masks": torch.rand(2, 3, 16), "channel_attention_mask": torch.rand(2, 16),
           "aligned_student": torch.rand(2, 16, 4, 5), "note": "not a tensor"}
    found = {m.name: (m.kind, tuple(m.values.shape)) for m in masks_of(out, grid=(4, 5), image=1)}
    assert found == {"spatial_masks": ("spatial", (3, 4, 5)), "fg_mask": ("spatial", (1, 4, 5)),
                     "channel_masks": ("channel", (3, 16)), "channel_attention_mask": ("channel", (1, 16))}


def test_a_method_without_masks_is_refused_by_name(capsys):
    assert probe_masks("mimic") == []
    assert {m.kind for m in probe_masks("acam", {"num_masks": 2})} == {"spatial", "channel"}
    # FGD draws its own masks: the foreground and background masks from the boxes
    assert {(m.name, m.kind) for m in probe_masks("fgd")} == {("mask_fg", "spatial"), ("mask_bg", "spatial")}
    with pytest.raises(NoMasksError, match=r"method 'mimic' has no masks to draw.*methods with masks: \[.*'acam'"):
        check_method_has_masks("mimic")
    from acamkd.cli import main

    # refused before the (missing) checkpoint or teacher is read
    code = main(["viz", "masks", f"{DEMO}/shapes_det_acam.yaml", "method.name=mimic", "method.options={}",
                 "--checkpoint", "no/such/file.pt"])
    assert code == 1
    assert "method 'mimic' has no masks" in capsys.readouterr().err


def tiny(root):
    return [f"data.root={root}", "data.shapes.train=4", "data.shapes.val=3", "data.shapes.size=[64,96]",
            "data.min_size=64", "data.max_size=96", "data.workers=0", "teacher.backbone=resnet18",
            "student.backbone=resnet18", "method.options.num_masks=2"]


def test_viz_masks_from_a_tiny_checkpoint(tmp_path):
    """A distillation checkpoint (random weights) of a tiny RetinaNet R18 -> R18 ACAM-KD run: one
    PNG per image with input + energies, 2 spatial masks (one row) and a 2 x C channel heat map."""
    from acamkd.config import load_config
    from acamkd.engine.checkpoint import save_checkpoint
    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_models, build_task
    from acamkd.viz.masks import mask_figures

    cfg = load_config(f"{DEMO}/shapes_det_acam.yaml", tiny(tmp_path / "shapes"))
    task = build_task(cfg, DistInfo())
    models = build_models(cfg, task, "distill", task.model_classes(task.val_dataset()), random_init=True)
    teacher_file, ckpt = tmp_path / "teacher.pt", tmp_path / "run" / "last.pt"
    torch.save(models.teacher.state_dict(), teacher_file)
    save_checkpoint(ckpt, {"student": models.student.state_dict(), "method": models.method.state_dict(),
                           "step": 7, "config": {"method": {"name": "acam"}}})
    cfg = load_config(f"{DEMO}/shapes_det_acam.yaml", [*tiny(tmp_path / "shapes"), f"teacher.checkpoint={teacher_file}"])
    written = mask_figures(cfg, str(ckpt), images=2, device="cpu")
    assert [os.path.relpath(p, tmp_path) for p in written] == ["run/masks/p3_image000.png", "run/masks/p3_image001.png"]
    rows = 1 + 1 + 1  # input and energies; 2 spatial masks (one row of 4); the channel heat map
    expected = figure_pixels(NCOLS * PANEL_IN[0], rows * PANEL_IN[1] + TITLE_IN)
    assert expected == (1200, 830)
    for path in written:
        assert png_size(path) == expected
    with pytest.raises(ValueError, match=r"--level 'p33'.*did you mean 'p3'"):
        mask_figures(cfg, str(ckpt), images=1, level="p33", device="cpu", out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="distilled with method 'mimic'"):
        save_checkpoint(tmp_path / "other.pt", {"student": {}, "method": {"x": torch.zeros(1)},
                                                "config": {"method": {"name": "mimic"}}})
        mask_figures(cfg, str(tmp_path / "other.pt"), images=1, device="cpu")
    json.dumps(written)  # plain strings
