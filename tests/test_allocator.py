"""odconv.keep_freed_memory: glibc keeps a freed 64 MiB tensor's memory in the process (and so does not
unmap it), where by default it goes back to the system. Each case runs in a fresh interpreter: the
setting is process-wide."""
import os
import subprocess
import sys

import pytest

from conftest import GLIBC_LINUX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Resident memory (MiB) before a 64 MiB tensor is written, while it lives, and after it is freed.
PROBE = """
import os, sys, torch, odconv
keep = sys.argv[1] == "keep"
applied = odconv.keep_freed_memory() if keep else None
page = os.sysconf("SC_PAGE_SIZE")
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
before = rss_mib()
t = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB
during = rss_mib()
del t
print(applied, before, during, rss_mib())
"""


def run_python(code, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def probe(mode):
    applied, before, during, after = run_python(PROBE, mode)
    return applied, float(before), float(during), float(after)


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's malloc on Linux only")
def test_freed_tensor_memory_stays_in_the_process():
    applied, before, during, after = probe("keep")
    assert applied == "True"
    assert during - before > 60, "the 64 MiB tensor was not resident"
    assert during - after < 4, f"the freed tensor's memory left the process: {during:.0f} -> {after:.0f} MiB"


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's malloc on Linux only")
def test_by_default_glibc_returns_the_freed_tensor():
    # the behaviour keep_freed_memory changes: without it the block is unmapped when freed
    applied, before, during, after = probe("default")
    assert applied == "None"
    assert during - before > 60
    assert during - after > 60, f"glibc kept the freed tensor by default: {during:.0f} -> {after:.0f} MiB"


def test_returns_whether_it_applied():
    assert run_python("import odconv; print(odconv.keep_freed_memory())") == [str(GLIBC_LINUX)]
