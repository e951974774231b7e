"""Keep the memory that tensors free in the process, for the next ones to reuse (Linux, glibc).

glibc's malloc serves each block of 32 MiB or more (and smaller ones until its adaptive threshold has
grown past them) with an mmap of its own and unmaps it when the block is freed. A training step on the
CPU allocates the same large activations, gradients and convolution scratch buffers on every step, so
each step takes them as fresh pages again: every 4 KiB page faults on its first write and the kernel
zeroes it. ``keep_freed_memory()`` turns that off, as allocators like jemalloc and tcmalloc do by design:
M_MMAP_MAX = 0 (every block from malloc's heaps) and M_TRIM_THRESHOLD = 2 GiB (freed memory stays in
the process unless more than that lies free at the top of a heap).

On this project's CPU machine (2 cores, torch 2.14.1) the GTSRB network's training step went from
135-151 to 181-182 images/s with ODConv layers and from 151-155 to 230-240 with plain ones, and the
process's peak resident memory grew by 8 % and 26 % (``python benchmarks/bench_train.py`` with and
without ``--release-memory``, two runs each; benchmarks/RESULTS.md).

The setting is process-wide and is inherited by forked children (DataLoader workers). Call it once,
before the large tensors exist.
"""
import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl, for one, has no mallopt parameters like these)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system (see the
    module docstring). Returns True where it applied (Linux with glibc), False where nothing changed."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success, 0 on error
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
