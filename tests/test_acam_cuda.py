"""GPU-only checks (skipped without CUDA): exactness on the GPU kernels and which kernel runs.

Run on a lent GPU by benchmarks/gpu_core.sh; CI has no GPU and skips them.
"""
import pytest
import torch
from torch.profiler import profile

from acamkd.methods.acam import ACAMLevel
from acamkd.methods.acam_reference import acam_level_plain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 matmuls/convs would blur an fp32 comparison; restore the settings afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("channels", [256, 19])
def test_fast_equals_plain_on_gpu_fp32(channels):
    torch.manual_seed(0)
    level = ACAMLevel(channels, channels, num_masks=6, init_std=0.5).cuda()
    teacher = torch.randn(2, channels, 9, 13, device="cuda")
    student = torch.randn(2, channels, 9, 13, device="cuda", requires_grad=True)
    fast = level(teacher, student)
    ref = acam_level_plain(level, teacher, student)
    for key in ref.losses:
        torch.testing.assert_close(fast.losses[key], ref.losses[key], rtol=1e-4, atol=1e-6)
    params = [student, *level.parameters()]
    g_fast = torch.autograd.grad(sum(fast.losses.values()), params)
    g_ref = torch.autograd.grad(sum(ref.losses.values()), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("channels", [256, 19])
def test_bf16_runs_a_fused_kernel_and_stays_close(channels):
    torch.manual_seed(0)
    level = ACAMLevel(channels, channels, num_masks=6, init_std=0.5).cuda()
    teacher = torch.randn(2, channels, 64, 96, device="cuda", dtype=torch.bfloat16)
    student = torch.randn(2, channels, 64, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile() as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        out = level(teacher, student)
        sum(out.losses.values()).backward()
    ops = {e.key for e in prof.key_averages()}
    fused = [op for op in ops if any(k in op for k in ("flash_attention", "efficient_attention", "cudnn_attention"))]
    assert fused, f"no fused SDPA kernel ran: {sorted(o for o in ops if 'scaled_dot' in o)}"
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    ref = acam_level_plain(level.float(), teacher.float(), student.detach().float())
    for key in ref.losses:
        torch.testing.assert_close(out.losses[key].float(), ref.losses[key].float(), rtol=5e-2, atol=1e-3)
