"""Does an argument error raised in the compiled CPU kernel reach Python as a RuntimeError?

The 2026-11-29 GPU check (H200, torch 2.11) segfaulted in tests/test_ops.py at the first test in
which the CPU kernel itself rejects its input (the C++ check, not the Python wrapper's); the same
tests pass here. This probe repeats that situation in steps, each printed before it runs, so a crash
shows in its log (with faulthandler's stack) which step it was:

  1. a C++ argument error from the CPU kernel, in a fresh process
  2. the same error from the CUDA kernel (if there is a GPU)
  3. torch.compile of a small ODConv model, run forward and backward (as tests/test_ops.py does)
  4. the CPU kernel's error again, after that compilation

    python -X faulthandler benchmarks/cpu_error_probe.py
"""
import os
import sys

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import odconv  # noqa: E402


def too_small_input(device):
    """odconv2d on a 2x2 input with a 3x3 kernel and no padding: the C++ check must raise."""
    x = torch.zeros(1, 2, 2, 2, device=device)
    w = torch.zeros(1, 2, 2, 3, 3, device=device)
    ones = lambda *size: torch.ones(*size, device=device)  # noqa: E731
    try:
        torch.ops.odconv.odconv2d(x, w, ones(1, 2), ones(1, 2), ones(1, 3, 3), ones(1, 1), [1, 1], [0, 0], [1, 1], 1)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    raise AssertionError(f"no error from the {device} kernel on a too small input")


def step(text):
    print(text, flush=True)


def main():
    info = odconv.backend_info()
    assert info["cpu"]["backend"] == "extension", info["cpu"]
    step("1. CPU kernel error, fresh process ...")
    step(f"   ok: {too_small_input('cpu')}")
    if torch.cuda.is_available() and info["cuda"]["backend"] == "extension":
        step("2. CUDA kernel error ...")
        step(f"   ok: {too_small_input('cuda')}")
    else:
        step("2. skipped: no GPU or no CUDA kernels")
    step("3. torch.compile of an ODConv model, forward and backward ...")
    model = torch.nn.Sequential(odconv.ODConv2d(4, 8, 3, padding=1), torch.nn.ReLU())
    compiled = torch.compile(model, fullgraph=True)
    compiled(torch.randn(2, 4, 6, 6)).square().sum().backward()
    step("   ok")
    step("4. CPU kernel error after compilation ...")
    step(f"   ok: {too_small_input('cpu')}")
    step("all steps passed")


if __name__ == "__main__":
    main()
