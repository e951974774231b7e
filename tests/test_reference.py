"""The pure-PyTorch reference against an independent slow oracle, in float64."""
import pytest
import torch

from conftest import GRID, case_id, make_inputs, odconv2d_oracle, unpack
from odconv.reference import odconv2d_reference


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_reference_matches_oracle(case):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups)
    out = odconv2d_reference(*inputs, stride, padding, dilation, groups)
    expected = odconv2d_oracle(*inputs, stride, padding, dilation, groups)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if batch:
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(expected, inputs, grad)
        for name, g, w in zip(("x", "weight", "channel", "filter", "spatial", "kernel"), got, want):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


def test_reference_empty_batch_has_zero_grads():
    inputs = make_inputs(0, 4, 6, 5, 3, 2, 1)
    out = odconv2d_reference(*inputs, (1, 1), (1, 1), (1, 1), 1)
    assert out.shape == (0, 6, 5, 5)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert grads[1].shape == inputs[1].shape and not grads[1].any()
