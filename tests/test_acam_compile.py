"""torch.compile of the whole method gives the eager values and gradients (the benchmark's
--compile path and any user who compiles their training step rely on it)."""
import pytest
import torch

from acamkd.methods.acam import ACAM, PAPER_MODE


@pytest.mark.slow
def test_compiled_acam_equals_eager():
    torch.manual_seed(0)
    method = ACAM({"p3": 16, "p4": 16}, {"p3": 8, "p4": 8}, num_masks=3, init_std=0.5, check_finite=False,
                  **PAPER_MODE)
    teacher = {"p3": torch.randn(2, 16, 6, 5), "p4": torch.randn(2, 16, 3, 3)}
    student = {"p3": torch.randn(2, 8, 6, 5, requires_grad=True), "p4": torch.randn(2, 8, 3, 3, requires_grad=True)}
    inputs = [*student.values(), *method.parameters()]

    def losses_and_grads(fn):
        losses = fn(teacher, student)
        grads = torch.autograd.grad(sum(losses.values()), inputs)
        return {k: v.detach() for k, v in losses.items()}, grads

    eager_losses, eager_grads = losses_and_grads(method)
    eager_stats = method.statistics()
    compiled_losses, compiled_grads = losses_and_grads(torch.compile(method))
    assert compiled_losses.keys() == eager_losses.keys()
    for key in eager_losses:
        torch.testing.assert_close(compiled_losses[key], eager_losses[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert method.statistics() == pytest.approx(eager_stats, rel=1e-5)
