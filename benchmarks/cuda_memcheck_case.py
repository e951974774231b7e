"""Small forward + backward runs through every code path of the CUDA kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/cuda_memcheck_case.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_memcheck_case.py --quick

(benchmarks/gpu_check.sh runs both, with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every buffer is its
own allocation and an access past its end is caught.) Covers float32/float64/float16/bfloat16, the
im2col and the direct (1x1) paths, groups and depthwise, stride/padding/dilation, a rectangular kernel,
a batch split over several chunks (partial last chunk, partial sample sets), the output masks and an
empty batch. --quick: one float32 case (forward + backward), enough for racecheck, which only looks at
shared memory. Exit status 0 when every result is finite and the float32/float64 ones match the
reference; memory errors are reported by the sanitizer (its --error-exitcode).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import odconv  # noqa: E402,F401  (loads the extension)
from odconv.reference import odconv2d_reference  # noqa: E402

# (batch, Cin, Cout, (H, W), (kh, kw), K, stride, padding, dilation, groups, dtype, chunk bytes)
CASES = [
    (5, 6, 8, (9, 7), (3, 5), 3, (2, 1), (1, 2), (1, 2), 2, torch.float32, "3000"),  # several chunks
    (3, 4, 6, (7, 7), (3, 3), 4, (1, 1), (1, 1), (1, 1), 1, torch.float64, None),
    (3, 8, 8, (6, 6), (3, 3), 4, (1, 1), (1, 1), (1, 1), 8, torch.float16, None),    # depthwise
    (4, 8, 6, (5, 5), (1, 1), 2, (1, 1), (0, 0), (1, 1), 1, torch.bfloat16, None),   # direct 1x1
    (7, 6, 9, (7, 7), (1, 1), 3, (2, 2), (1, 1), (1, 1), 3, torch.float32, "1"),     # 1x1 via im2col, 1/chunk
    (0, 4, 6, (7, 7), (3, 3), 4, (1, 1), (1, 1), (1, 1), 1, torch.float32, None),    # empty batch
]


def make(case, device="cuda"):
    batch, cin, cout, (h, w), (kh, kw), K, stride, padding, dilation, groups, dtype, _ = case
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(batch, cin, h, w, generator=gen, dtype=torch.float64),
        torch.randn(K, cout, cin // groups, kh, kw, generator=gen, dtype=torch.float64) * 0.5,
        torch.sigmoid(torch.randn(batch, cin, generator=gen, dtype=torch.float64)),
        torch.sigmoid(torch.randn(batch, cout, generator=gen, dtype=torch.float64)),
        torch.sigmoid(torch.randn(batch, kh, kw, generator=gen, dtype=torch.float64)),
        torch.softmax(torch.randn(batch, K, generator=gen, dtype=torch.float64), dim=1),
    ]
    return [t.to(device=device, dtype=dtype) for t in tensors], (list(stride), list(padding), list(dilation), groups)


def run(case):
    inputs, conv = make(case)
    chunk = case[-1]
    if chunk is None:
        os.environ.pop("ODCONV_CUDA_CHUNK_BYTES", None)
    else:
        os.environ["ODCONV_CUDA_CHUNK_BYTES"] = chunk
    out = torch.ops.odconv.odconv2d(*inputs, *conv)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gy = gy.to(device="cuda", dtype=out.dtype)
    results = {}
    for mask in ([True, True], [True, False], [False, True]):
        results[tuple(mask)] = torch.ops.odconv.odconv2d_backward(gy, *inputs, *conv, mask)
    torch.cuda.synchronize()
    grads = results[(True, True)]
    ok = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    if case[10] in (torch.float32, torch.float64):
        ref_in = [t.detach().cpu().double().requires_grad_() for t in inputs]
        want = odconv2d_reference(*ref_in, *conv)
        want_grads = torch.autograd.grad(want, ref_in, gy.cpu().double()) if want.numel() else None
        tol = 1e-4 if case[10] == torch.float32 else 1e-9

        def close(got, expected):
            scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
            return torch.allclose(got.cpu().double(), expected, rtol=tol, atol=tol * scale)

        ok = ok and close(out, want.detach())
        if want_grads is not None:
            ok = ok and all(close(g, w) for g, w in zip(grads, want_grads))
    print(f"{'ok  ' if ok else 'FAIL'} {case[:10]} {case[10]} chunk={case[11]}", flush=True)
    return ok


def main():
    quick = "--quick" in sys.argv
    assert torch.cuda.is_available(), "needs a CUDA device"
    cases = CASES[:1] if quick else CASES
    failures = sum(not run(case) for case in cases)
    print(f"{len(cases) - failures}/{len(cases)} cases ok")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
