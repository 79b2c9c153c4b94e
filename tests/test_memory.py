"""glibc's heap, told to share arenas and to hand freed pages back (daemon/memory.py).

Measured in a fresh interpreter: threads allocate and free a few hundred MB, leaving
a few survivors scattered through their arenas, as deploys' writer and git threads
do; the resident size must come back down with trim().
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.testenv import ROOT

PROGRAM = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
from daemon import memory

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) / 1024

kept = []
def work():
    blobs = [bytes(1500) + str(i).encode() for i in range(60000)]
    kept.extend(blobs[::200])
    del blobs

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
before = rss()
trimmed = memory.trim()
print(json.dumps({"before": before, "after": rss(), "trimmed": trimmed, "kept": len(kept)}))
"""


def test_trim_hands_the_freed_heap_of_threads_back_to_the_kernel() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    got = json.loads(out.stdout)
    assert got["trimmed"] is True and got["kept"] == 1200
    # Without trim() the freed ~350 MB stays resident (the survivors pin the arenas).
    assert got["before"] > 200, got
    assert got["after"] < got["before"] / 3, got


def test_the_arena_limit_is_taken_by_glibc() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); from daemon import memory; "
            "print(memory.limit_arenas())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "True"
