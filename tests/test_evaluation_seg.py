"""SegMetric against a direct numpy confusion-matrix computation, plus its input checks."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from acamkd.evaluation import SegMetric


def reference(preds: list[np.ndarray], targets: list[np.ndarray], K: int, ignore: int) -> dict:
    """Plain numpy: confusion matrix by np.add.at over non-ignored pixels, then the textbook formulas."""
    cm = np.zeros((K, K), dtype=np.int64)
    for p, t in zip(preds, targets):
        keep = t != ignore
        np.add.at(cm, (t[keep].astype(np.int64), p[keep].astype(np.int64)), 1)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    gt = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    return {
        "cm": cm, "IoU": iou, "Acc": acc,
        "mIoU": float(np.nanmean(iou)) if np.any(union > 0) else math.nan,
        "mAcc": float(np.nanmean(acc)) if np.any(gt > 0) else math.nan,
        "aAcc": float(tp.sum() / cm.sum()) if cm.sum() > 0 else math.nan,
    }


def assert_close(ours: dict, ref: dict):
    for key in ("IoU", "Acc"):
        got = np.array(ours[key], dtype=np.float64)
        assert len(ours[key]) == len(ref[key])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref[key]), err_msg=key)
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=1e-12, equal_nan=True, err_msg=key)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert isinstance(ours[key], float)
        if math.isnan(ref[key]):
            assert math.isnan(ours[key]), key
        else:
            assert abs(ours[key] - ref[key]) < 1e-12, (key, ours[key], ref[key])


def random_maps(rng, K, shape, ignore, p_ignore=0.2, n_used=None):
    """Random (pred, target) label maps; ``n_used`` limits both to the first classes."""
    hi = K if n_used is None else n_used
    pred = rng.integers(0, hi, size=shape)
    target = rng.integers(0, hi, size=shape)
    target[rng.random(shape) < p_ignore] = ignore
    return pred, target


@given(
    K=st.integers(1, 25),
    batches=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
    p_ignore=st.sampled_from([0.0, 0.3, 1.0]),
    ignore=st.sampled_from([255, -1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_numpy_reference(K, batches, p_ignore, ignore, seed):
    rng = np.random.default_rng(seed)
    metric = SegMetric(K, ignore_index=ignore)
    preds, targets = [], []
    for shape in batches:
        p, t = random_maps(rng, K, shape, ignore, p_ignore)
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    ref = reference(preds, targets, K, ignore)
    assert metric.confusion.dtype == torch.int64
    np.testing.assert_array_equal(metric.confusion.numpy(), ref["cm"])
    assert_close(metric.compute(), ref)


@pytest.mark.parametrize("K", [2, 19, 150])
def test_seeded_larger_maps(K):
    rng = np.random.default_rng(K)
    p, t = random_maps(rng, K, (2, 64, 96), 255)
    metric = SegMetric(K)
    metric.update(torch.from_numpy(p).to(torch.int32), torch.from_numpy(t).to(torch.uint8 if K < 255 else torch.int64))
    assert_close(metric.compute(), reference([p], [t], K, 255))


def test_absent_classes_excluded_from_mean():
    K = 6
    rng = np.random.default_rng(0)
    p, t = random_maps(rng, K, (2, 16, 16), 255, n_used=3)  # classes 3, 4, 5 never appear
    p[0, 0, 0], t[0, 0, 1] = 4, 4  # class 4: only a wrong prediction and a missed pixel -> IoU 0
    metric = SegMetric(K)
    metric.update(torch.from_numpy(p), torch.from_numpy(t))
    out = metric.compute()
    assert math.isnan(out["IoU"][3]) and math.isnan(out["IoU"][5])
    assert out["IoU"][4] == 0.0
    assert math.isclose(out["mIoU"], sum(out["IoU"][:3]) / 4)  # mean over classes 0, 1, 2, 4
    assert math.isnan(out["Acc"][3]) and out["Acc"][4] == 0.0
    assert_close(out, reference([p], [t], K, 255))


def test_perfect_prediction():
    t = torch.randint(0, 5, (2, 8, 8))
    t[:, 0] = 255
    metric = SegMetric(5)
    metric.update(t.clone().clamp(max=4), t)
    out = metric.compute()
    assert out["mIoU"] == 1.0 and out["aAcc"] == 1.0 and out["mAcc"] == 1.0


def test_logits_path():
    K = 7
    logits = torch.randn(3, K, 10, 12)
    target = torch.randint(0, K, (3, 10, 12))
    target[:, :2] = 255
    a, b = SegMetric(K), SegMetric(K)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.confusion, b.confusion)
    c = SegMetric(K)  # one image: (K, H, W) logits with an (H, W) target
    for i in range(3):
        c.update(logits[i], target[i])
    assert torch.equal(c.confusion, a.confusion)
    d = SegMetric(K)
    d.update(logits.half(), target)  # low-precision logits are fine too
    assert int(d.confusion.sum()) == int(a.confusion.sum())


def test_accumulation_equals_one_update_on_concatenation():
    K = 11
    rng = np.random.default_rng(3)
    parts = [random_maps(rng, K, (b, 13, 17), 255) for b in (1, 2, 3)]
    many = SegMetric(K)
    for p, t in parts:
        many.update(torch.from_numpy(p), torch.from_numpy(t))
    one = SegMetric(K)
    one.update(torch.from_numpy(np.concatenate([p for p, _ in parts])),
               torch.from_numpy(np.concatenate([t for _, t in parts])))
    assert torch.equal(many.confusion, one.confusion)
    a, b = many.compute(), one.compute()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]), err_msg=key)  # NaN == NaN here


def test_reset_and_device():
    metric = SegMetric(4, device="cpu")
    assert metric.confusion is not None and metric.confusion.device.type == "cpu"
    metric.update(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
    assert int(metric.confusion.sum()) == 4
    metric.reset()
    assert int(metric.confusion.sum()) == 0
    assert math.isnan(metric.compute()["mIoU"])  # nothing counted yet: NaN, not a crash


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    K = 19
    pred, target = torch.randint(0, K, (2, 32, 32)), torch.randint(0, K, (2, 32, 32))
    target[:, :4] = 255
    cpu, gpu = SegMetric(K), SegMetric(K)
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.confusion.is_cuda
    assert torch.equal(gpu.confusion.cpu(), cpu.confusion)


# ---------------------------------------------------------------- errors

def test_shape_mismatch():
    metric = SegMetric(5)
    with pytest.raises(ValueError, match=r"pred \(2, 8, 8\) and target \(2, 8, 9\)"):
        metric.update(torch.zeros(2, 8, 8, dtype=torch.int64), torch.zeros(2, 8, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"upsample"):
        metric.update(torch.zeros(2, 5, 4, 4), torch.zeros(2, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"pred \(2, 4, 8, 8\) have 4 classes in dim 1, expected num_classes K=5"):
        metric.update(torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\)"):
        metric.update(torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64))


def test_target_out_of_range_lists_values():
    metric = SegMetric(19)
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, 0, 0], target[0, 1, 1], target[0, 2, 2] = 19, 254, 255  # 255 is ignore_index: fine
    with pytest.raises(ValueError, match=r"target has values outside \[0, 19\).*ignore_index=255: \[19, 254\]"):
        metric.update(torch.zeros_like(target), target)
    target[0, 3, 3] = -1
    with pytest.raises(ValueError, match=r"\[-1, 19, 254\]"):
        metric.update(torch.zeros_like(target), target)
    assert int(metric.confusion.sum()) == 0  # a rejected batch adds nothing


def test_pred_out_of_range():
    metric = SegMetric(19)
    pred = torch.zeros(1, 4, 4, dtype=torch.int64)
    pred[0, 0, 0], pred[0, 1, 1] = 19, -3
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 19\): \[-3, 19\]"):
        metric.update(pred, torch.zeros_like(pred))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SegMetric(0)
    with pytest.raises(ValueError, match="ignore_index=3"):
        SegMetric(5, ignore_index=3)
    with pytest.raises(TypeError, match="target must be integer"):
        SegMetric(5).update(torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, 4))
    with pytest.raises(TypeError, match="pred must be"):
        SegMetric(5).update(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="no update yet"):
        SegMetric(5).compute()


# ---------------------------------------------------------------- distributed reduction

def test_all_reduce_without_process_group_is_noop():
    metric = SegMetric(3)
    metric.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 1]]))
    before = metric.confusion.clone()
    assert metric.all_reduce() is metric
    assert metric.reduce_() is metric
    assert torch.equal(metric.confusion, before)


def _rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    pred = torch.randint(0, 5, (2, 6, 6), generator=g)
    target = torch.randint(0, 5, (2, 6, 6), generator=g)
    target[:, 0] = 255
    return pred, target


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for skip_rank in (-1, world - 1):  # every rank has data / the last rank saw no batch
            metric = SegMetric(5)
            if rank != skip_rank:  # a rank without data must still take part, with zeros
                metric.update(*_rank_data(rank))
            assert metric.all_reduce() is metric
            expected = SegMetric(5)
            for r in range(world):
                if r != skip_rank:
                    expected.update(*_rank_data(r))
            assert torch.equal(metric.confusion, expected.confusion), (rank, skip_rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters import torch: ~8 s on 2 busy cores
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_all_reduce_two_processes_gloo():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
