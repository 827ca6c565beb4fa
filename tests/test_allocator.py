"""mdeq.engine.allocator: freed memory is reused, so a new tensor does not fault in fresh pages (glibc only)."""
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from mdeq.engine.allocator import keep_freed_memory

def faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        x = torch.empty(16 * 2**20)  # 64 MiB, written in full: every page is touched
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(2)
default = faults(10)
assert keep_freed_memory()
faults(8)  # the heap grows until a freed block fits the next tensor
print(default, faults(10))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_pages():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, keep = map(int, out.split())
    pages = 10 * 64 * 2**20 // 4096  # ten 64 MiB tensors
    assert default > pages // 2  # glibc maps each one afresh: its pages fault in again
    assert keep < pages // 10, (default, keep)  # the freed block is reused: no new pages
