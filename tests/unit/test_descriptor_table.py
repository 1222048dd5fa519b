"""The gateway grows its file descriptor table once at start, so a crowd that connects at
once does not make ``accept`` wait for the kernel to grow it (an RCU grace period, 10-12
ms, in a process with threads)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

CHILD = """
import os, sys
from gateway.server import reserve_descriptor_table

def table_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])

before = table_size()
reserved = reserve_descriptor_table(int(sys.argv[1]))
print(before, reserved, table_size(), len(os.listdir("/proc/self/fd")))
"""


def run_child(size: int, soft_limit: int | None = None) -> tuple[int, int, int, int]:
    def lower_limit() -> None:
        if soft_limit is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, hard))

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(size)],
        capture_output=True, text=True, check=True, preexec_fn=lower_limit,
    ).stdout  # fmt: skip
    before, reserved, after, open_now = (int(v) for v in out.split())
    return before, reserved, after, open_now


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_table_is_grown_to_the_size_asked_and_no_descriptor_stays_open() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        pytest.skip("needs a soft RLIMIT_NOFILE of 4096 or more")
    before, reserved, after, open_now = run_child(4096)
    assert before < 4096  # a new process's table starts small
    assert reserved == 4096
    assert after >= 4096
    _, _, _, open_without = run_child(1)  # the same child, nothing reserved past its own
    assert open_now == open_without


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_soft_limit_caps_the_table() -> None:
    _, reserved, after, _ = run_child(1 << 20, soft_limit=1000)
    assert reserved == 1000
    assert 1000 <= after < 4096
