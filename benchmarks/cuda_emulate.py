"""Runs the CUDA kernels' source (csrc/cuda/odconv_cuda.cu) on the CPU, for machines without a GPU.

Not a substitute for the GPU tests (tests/test_cuda.py): it checks the index math, the chunking,
the GEMM views and the reductions of the CUDA code path, not CUDA itself. How:

* the .cu source is rewritten into C++: ``kernel<<<grid, threads, smem, stream>>>(args)`` becomes
  ``emu::launch(kernel, grid, threads, args)``; ``__global__``/``__device__`` are dropped;
  ``__shared__`` becomes ``static`` (blocks run one after another, so a static is per block);
* ``emu::launch`` runs the blocks one after another; the threads of a block run one after another
  too, except in kernels with ``__syncthreads``/``__shfl_down_sync``, where they are cooperative
  contexts (ucontext) on one OS thread that switch at each barrier (block or warp), in thread order;
  a barrier that some threads never reach is reported as a deadlock. (Data races are not detected:
  that is compute-sanitizer's racecheck, in benchmarks/gpu_check.sh);
* the host code is unchanged: at::bmm_out / at::mm_out / addmm_ run on CPU tensors;
* the kernels are registered as ``torch.ops.odconv_emu.odconv2d`` / ``odconv2d_backward`` on CPU.

    python benchmarks/cuda_emulate.py            # builds (15-60 s), then checks a grid of cases

tests/test_cuda.py runs it on machines without a GPU (CI).

Checks output and the six gradients against odconv.reference in float64 (and float32/bfloat16/
float16 at their precision), with many batch chunks (ODCONV_CUDA_CHUNK_BYTES) and with one.
"""
import os
import re
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIM = r"""
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>
namespace emu {
struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
// thread i of a block (linear, x fastest, as CUDA numbers threads into warps)
inline Dim3 thread_index(int i, const Dim3& block) {
  return {static_cast<unsigned>(i) % block.x, static_cast<unsigned>(i) / block.x, 0};
}
inline Dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;

// One block's threads as cooperative contexts on this OS thread: a thread runs until it waits at a
// barrier (__syncthreads: the block; __shfl_down_sync: its warp) or returns; the scheduler resumes the
// threads in order. A barrier some threads never reach is reported as a deadlock.
struct Thread { ucontext_t ctx; int barrier = -1; bool done = false; };
constexpr size_t kStack = 64 * 1024;
inline std::vector<std::unique_ptr<char[]>> stacks_;  // reused by every block
struct Barrier { int expected = 0, arrived = 0; };
inline ucontext_t scheduler_ctx;
inline std::vector<Thread>* threads_ = nullptr;
inline std::vector<Barrier> barriers_;   // [0] = block, [1 + w] = warp w
inline double warp_buf_[32 * 32];
inline int current_ = 0;
inline void (*body_)(void*) = nullptr;
inline void* body_arg_ = nullptr;

inline void wait_at(int b) {
  Barrier& bar = barriers_[b];
  Thread& self = (*threads_)[current_];
  if (++bar.arrived == bar.expected) {  // the last one: release everybody
    bar.arrived = 0;
    for (Thread& t : *threads_)
      if (t.barrier == b) t.barrier = -1;
    return;
  }
  self.barrier = b;
  swapcontext(&self.ctx, &scheduler_ctx);
  threadIdx_ = thread_index(current_, blockDim_);
}

inline void trampoline() {
  body_(body_arg_);
  (*threads_)[current_].done = true;
}

template <typename F>
void run_block(int nthreads, F& f) {
  std::vector<Thread> threads(nthreads);
  threads_ = &threads;
  barriers_.assign(1 + (nthreads + 31) / 32, {});
  barriers_[0].expected = nthreads;
  for (int w = 0; w * 32 < nthreads; ++w) barriers_[1 + w].expected = std::min(32, nthreads - 32 * w);
  body_ = [](void* p) { (*static_cast<F*>(p))(); };
  body_arg_ = &f;
  while (stacks_.size() < threads.size()) stacks_.emplace_back(new char[kStack]);
  for (size_t i = 0; i < threads.size(); ++i) {
    Thread& t = threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks_[i].get();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &scheduler_ctx;
    makecontext(&t.ctx, trampoline, 0);
  }
  for (;;) {
    bool progressed = false, all_done = true;
    for (int i = 0; i < nthreads; ++i) {
      Thread& t = threads[i];
      if (t.done) continue;
      all_done = false;
      if (t.barrier >= 0) continue;
      current_ = i;
      threadIdx_ = thread_index(i, blockDim_);
      swapcontext(&scheduler_ctx, &t.ctx);
      progressed = true;
    }
    if (all_done) break;
    if (!progressed) {
      std::fprintf(stderr, "emu: deadlock: threads wait at a barrier others never reach\n");
      std::abort();
    }
  }
  threads_ = nullptr;
}

template <typename... KArgs, typename... Args>
void launch(bool cooperative, void (*kernel)(KArgs...), Dim3 grid, Dim3 block, Args... args) {
  gridDim_ = grid;
  blockDim_ = block;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned int by = 0; by < grid.y; ++by)
  for (unsigned int bx = 0; bx < grid.x; ++bx) {
    blockIdx_ = {bx, by, 0};
    if (!cooperative) {  // no barriers: the threads one after another
      for (int t = 0; t < threads; ++t) {
        threadIdx_ = thread_index(t, block);
        kernel(args...);
      }
      continue;
    }
    auto body = [&]() { kernel(args...); };
    run_block(threads, body);
  }
}
} // namespace emu
#define threadIdx emu::threadIdx_
#define blockIdx emu::blockIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
inline void __syncthreads() { emu::wait_at(0); }
template <typename T>
T __shfl_down_sync(unsigned int, T v, int offset) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double* buf = emu::warp_buf_ + 32 * warp;
  buf[lane] = static_cast<double>(v);
  emu::wait_at(1 + warp);
  const T r = lane + offset < 32 ? static_cast<T>(buf[lane + offset]) : v;
  emu::wait_at(1 + warp);
  return r;
}
typedef int cudaStream_t;
using dim3 = emu::Dim3;
"""

SCHEMAS = r"""
TORCH_LIBRARY(odconv_emu, m) {
  m.def("odconv2d(Tensor x, Tensor weight, Tensor channel_att, Tensor filter_att, "
        "Tensor spatial_att, Tensor kernel_att, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> Tensor");
  m.def("odconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor channel_att, "
        "Tensor filter_att, Tensor spatial_att, Tensor kernel_att, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool[2] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(odconv_emu, CPU, m) {
  m.impl("odconv2d", &odconv::odconv2d_cuda);
  m.impl("odconv2d_backward", &odconv::odconv2d_backward_cuda);
}
"""


def _rewrite_launches(src):
    """kernel<T...>  <<<grid, threads, smem, stream>>>(  ->  emu::launch(conc, kernel<T...>, grid, threads, """
    out, pos = [], 0
    while True:
        start = src.find("<<<", pos)
        if start < 0:
            out.append(src[pos:])
            return "".join(out)
        end = src.find(">>>(", start)
        # the callee: identifier with optional template arguments, before the <<<
        i = start
        while src[i - 1].isspace():
            i -= 1
        if src[i - 1] == ">":
            depth = 0
            while True:
                i -= 1
                depth += {">": 1, "<": -1}.get(src[i], 0)
                if depth == 0:
                    break
        while src[i - 1].isalnum() or src[i - 1] == "_":
            i -= 1
        callee = src[i:start].strip()
        config, depth, parts, cur = src[start + 3:end], 0, [], ""
        for ch in config:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        concurrent = "true" if any(k in callee for k in ("filter_grad_kernel", "spatial_grad_kernel", "scale_grad_kernel")) else "false"
        out.append(src[pos:i])
        out.append(f"emu::launch({concurrent}, {callee}, {parts[0].strip()}, {parts[1].strip()}, ")
        pos = end + 4


def emulated_source():
    src = open(os.path.join(ROOT, "csrc", "cuda", "odconv_cuda.cu")).read()
    src = re.sub(r"#include <c10/cuda/[^>]+>\n", "", src)
    src = src.replace('#include "../odconv.h"', f'#include "{ROOT}/csrc/odconv.h"')
    src = _rewrite_launches(src)
    src = re.sub(r"__launch_bounds__\([^)]*\)", "", src)
    for token, repl in (("__global__", ""), ("__host__", ""), ("__device__", ""), ("__forceinline__", "inline"),
                        ("__shared__", "static"), ("C10_CUDA_KERNEL_LAUNCH_CHECK()", "(void)0"),
                        ("c10::cuda::getCurrentCUDAStream()", "0"), ("x.is_cuda()", "true")):
        src = src.replace(token, repl)
    src = src.replace("const c10::cuda::CUDAGuard device_guard(x.device());", "")
    assert "<<<" not in src and "c10::cuda" not in src, "unhandled CUDA construct"
    src = src[:src.index("TORCH_LIBRARY_IMPL(odconv, CUDA, m)")] + SCHEMAS
    # the shim (and its threadIdx/blockIdx macros) after the includes, where the kernels start
    anchor = "#include <tuple>\n"
    assert anchor in src
    return src.replace(anchor, anchor + SHIM, 1)


def common_source():
    """csrc/odconv.cpp without its schemas and module init (the checks only)."""
    src = open(os.path.join(ROOT, "csrc", "odconv.cpp")).read()
    src = src.replace('#include "odconv.h"', f'#include "{ROOT}/csrc/odconv.h"')
    src = src[:src.index('extern "C" {')] + src[src.index("namespace odconv {"):]
    return src[:src.index("TORCH_LIBRARY(odconv, m)")]


def build(verbose=False):
    from torch.utils.cpp_extension import load
    tmp = os.path.join(tempfile.gettempdir(), "odconv_cuda_emulate")
    os.makedirs(tmp, exist_ok=True)
    paths = []
    for name, text in (("odconv_cuda_emu.cpp", emulated_source()), ("odconv_common_emu.cpp", common_source())):
        path = os.path.join(tmp, name)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        paths.append(path)
    load(name="odconv_cuda_emu", sources=paths, extra_cflags=["-O1", "-std=c++20"], is_python_module=False, verbose=verbose, build_directory=tmp)


def main():
    os.environ.setdefault("MAX_JOBS", "1")
    build(verbose="-v" in sys.argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import GRID, case_id, make_inputs, tolerances, unpack
    from odconv.reference import odconv2d_reference

    torch.set_num_threads(1)
    names = ("x", "weight", "channel_att", "filter_att", "spatial_att", "kernel_att")
    failures = 0

    def check(case, dtype, chunk_bytes, mask=(True, True), requires_grad=False):
        nonlocal failures
        if chunk_bytes is None:
            os.environ.pop("ODCONV_CUDA_CHUNK_BYTES", None)
        else:
            os.environ["ODCONV_CUDA_CHUNK_BYTES"] = str(chunk_bytes)
        batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
        inputs = [t.detach().to(dtype) for t in make_inputs(batch, cin, cout, size, kernel, K, groups)]
        ref_in = [t.double().clone().requires_grad_() for t in inputs]
        if requires_grad:  # a direct call on tensors that require grad must work too
            inputs = [t.clone().requires_grad_() for t in inputs]
        conv = (list(stride), list(padding), list(dilation), groups)
        out = torch.ops.odconv_emu.odconv2d(*inputs, *conv)
        want = odconv2d_reference(*ref_in, stride, padding, dilation, groups)
        gy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grads = torch.ops.odconv_emu.odconv2d_backward(gy.to(dtype), *inputs, *conv, list(mask))
        want_grads = torch.autograd.grad(want, ref_in, gy)
        rtol, atol = tolerances(dtype)
        if dtype in (torch.float16, torch.bfloat16):  # inputs rounded once more inside: be coarse
            rtol, atol = rtol * 4, atol * 4
        label = f"{case_id(case)} {dtype} chunk={chunk_bytes} mask={mask}"
        try:
            assert out.dtype == dtype and out.is_contiguous()
            torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
            for i, (name, g, w) in enumerate(zip(names, grads, want_grads)):
                wanted = mask[0] if i == 0 else mask[1]
                assert g.shape == w.shape and g.dtype == dtype and g.is_contiguous(), name
                if not wanted:
                    assert not g.any(), f"{name} not asked for but nonzero"
                    continue
                scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
                torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * scale,
                                           msg=lambda m, name=name: f"grad {name}: {m}")
        except AssertionError as error:
            failures += 1
            print(f"FAIL {label}: {error}", flush=True)
            return
        print(f"ok   {label}", flush=True)

    for case in GRID:
        check(case, torch.float64, None)
        check(case, torch.float64, 1)       # one sample per chunk
        check(case, torch.float64, 3000)    # a few samples per chunk, a partial last chunk
    for case in GRID[:6]:
        check(case, torch.float32, 2000)
    check(GRID[0], torch.float64, 1, mask=(True, False))
    check(GRID[0], torch.float64, None, mask=(False, True))
    check(GRID[7], torch.float64, None, mask=(False, True))
    check(GRID[0], torch.float64, None, mask=(False, False))
    check(GRID[7], torch.float32, None, requires_grad=True)
    check((9, 8, 8, 6, 3, 4, 1, 1, 1, 2), torch.float64, 10**4)
    for dtype in (torch.bfloat16, torch.float16):
        check((4, 8, 8, 6, 3, 4, 1, 1, 1, 1), dtype, None)
    from test_cuda import WIDE_CASES  # wider than the thread blocks: every strided kernel loop repeats
    for case in WIDE_CASES:
        check(case, torch.float64, None)
        check(case, torch.float64, 200000)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
