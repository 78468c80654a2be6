"""Sliding-window inference: window placement, stitching and averaging against plain loops, and
equality with whole-image inference where that must hold."""
import pytest
import torch
from torch import nn

from acamkd.evaluation import sliding_window_logits, window_starts
from acamkd.models.segmentation import build_segmenter


@pytest.mark.parametrize("size,window,stride,expected", [
    (10, 4, 3, [0, 3, 6]),          # ceil(6/3)+1 = 3 windows, the last ends at 10
    (11, 4, 3, [0, 3, 6, 7]),       # the last window is moved back to end at the border
    (8, 8, 4, [0]),                 # fits: one window
    (5, 8, 4, [0]),                 # smaller than the window: one (smaller) window
    (9, 8, 8, [0, 1]),
    (1024, 512, 341, [0, 341, 512]),
])
def test_window_starts(size, window, stride, expected):
    starts = window_starts(size, window, stride)
    assert starts == expected
    covered = set()
    for s in starts:
        assert 0 <= s and s + min(window, size) <= size  # inside the image
        covered.update(range(s, s + min(window, size)))
    assert covered == set(range(size))  # every pixel covered


@pytest.mark.parametrize("args,match", [((10, 4, 5), "exceeds window"), ((10, 0, 1), "window must be"),
                                        ((0, 4, 2), "size must be"), ((10, 4, 1.5), "stride must be")])
def test_window_starts_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        window_starts(*args)


class _CallIndex(nn.Module):
    """Returns, for the k-th call, a (B, K, h, w) block filled with k: reveals which windows
    covered each pixel and how they were averaged."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.calls = num_classes, 0

    def forward(self, x):
        self.calls += 1
        return torch.full((x.shape[0], self.num_classes, *x.shape[-2:]), float(self.calls))


def _reference_average(H, W, win, stride):
    """Plain loops: each pixel's mean of the indices of the windows that contain it."""
    tops, lefts = window_starts(H, win[0], stride[0]), window_starts(W, win[1], stride[1])
    total = [[0.0] * W for _ in range(H)]
    count = [[0] * W for _ in range(H)]
    k = 0
    for t in tops:
        for left in lefts:
            k += 1
            for y in range(t, t + win[0]):
                for x in range(left, left + win[1]):
                    total[y][x] += k
                    count[y][x] += 1
    return torch.tensor([[total[y][x] / count[y][x] for x in range(W)] for y in range(H)])


@pytest.mark.parametrize("H,W,win,stride", [(13, 17, (6, 8), (4, 5)), (16, 16, (8, 8), (8, 8)),
                                            (9, 20, (9, 7), (3, 7))])
def test_windows_are_stitched_and_averaged_like_the_plain_loops(H, W, win, stride):
    model = _CallIndex(num_classes=3)
    out = sliding_window_logits(model, torch.zeros(2, 3, H, W), win, stride, num_classes=3)
    expected = _reference_average(H, W, win, stride)
    assert out.shape == (2, 3, H, W)
    assert torch.allclose(out, expected.expand(2, 3, H, W))
    assert model.calls == len(window_starts(H, win[0], stride[0])) * len(window_starts(W, win[1], stride[1]))


def test_pointwise_model_gives_the_whole_image_result_with_any_windows():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)  # no spatial context: windows cannot change its output
    images = torch.randn(2, 3, 21, 30)
    with torch.no_grad():
        whole = model(images)
    for win, stride in (((8, 8), (5, 3)), ((21, 30), (21, 30)), ((7, 29), (7, 1))):
        slid = sliding_window_logits(model, images, win, stride, num_classes=5)
        assert torch.allclose(slid, whole, atol=1e-6), (win, stride)


def test_segmenter_on_an_image_that_fits_equals_whole_image_inference():
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3", "resnet18", num_classes=9).eval()
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        whole = model(images)
    for window in ((48, 64), (64, 96)):  # the image fits: one window, the whole image
        slid = sliding_window_logits(model, images, window, (32, 32), num_classes=9)
        assert torch.equal(slid, whole)


def test_segmenter_with_overlapping_windows_is_close_to_whole_image_inference():
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3", "resnet18", num_classes=4).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = model(images)
    slid = sliding_window_logits(model, images, (64, 64), (64, 32), num_classes=4)
    assert slid.shape == whole.shape and torch.isfinite(slid).all()
    assert not torch.equal(slid, whole)  # context differs at the window borders, as it should


def test_wrong_model_output_is_a_clear_error():
    with pytest.raises(ValueError, match="num_classes=4"):
        sliding_window_logits(nn.Conv2d(3, 5, 1), torch.randn(1, 3, 16, 16), (8, 8), (8, 8), num_classes=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sliding_window_logits(nn.Conv2d(3, 4, 1), torch.randn(3, 16, 16), (8, 8), (8, 8), num_classes=4)
