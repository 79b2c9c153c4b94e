"""Watch `deployd serve`'s event loop from inside its process, for the benchmarks.

`command(...)` is the argv that runs `deployd` under a wrapper: every callback over
SLOW_SECONDS is timed (wall, and CPU on the loop's thread) and its stack sampled,
the loop's thread is profiled every 10 ms, and asyncio's debug mode may be turned on
(its own "Executing ... took" warnings). daemon/ is not touched. `slow_callbacks` and
`loop_profile` read what the wrapper wrote to the daemon's stderr.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SLOW_SECONDS = 0.05

# Run in the daemon's process instead of `python -m daemon.cli`: every event loop
# made through the policy runs in debug mode and reports callbacks over 50 ms.
WRAPPER = r"""
import asyncio, sys, threading, time

slow, debug = float(sys.argv[1]), sys.argv[2] == "debug"

class SlowCallbackPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        loop = super().new_event_loop()
        loop.set_debug(debug)
        loop.slow_callback_duration = slow
        return loop

# What asyncio's warning cannot say: where the loop's thread is while a callback runs
# long (its stack, sampled every `slow` seconds), and how much of the callback's wall
# time was CPU on that thread (little CPU: the thread waited, or the OS ran others).
running = [0, 0.0]  # callback number, its start
original = asyncio.events.Handle._run

def timed_run(self):
    running[0] += 1
    running[1] = start = time.perf_counter()
    cpu = time.thread_time()
    try:
        return original(self)
    finally:
        wall = time.perf_counter() - start
        running[1] = 0.0
        if wall > slow:
            sys.stderr.write(
                f"BENCH slow #{running[0]} wall {wall:.3f} cpu {time.thread_time() - cpu:.3f}\n"
            )

busy = {}  # where the loop's thread is, every 10 ms (the innermost project frame)
ticks = [0, 0]  # samples, of which inside a callback

def profile(frame):
    inner = None
    while frame is not None:
        path = frame.f_code.co_filename
        if "/daemon/" in path or "/site-packages/" in path:
            where = f"{path}:{frame.f_lineno}:{frame.f_code.co_name}"
            if "/daemon/" in path:
                return where
            inner = inner or where
        frame = frame.f_back
    return inner or "(stdlib only: asyncio itself)"

def report():
    sys.stderr.write(f"BENCH profile {ticks[0]} samples, {ticks[1]} inside callbacks\n")
    for where, k in sorted(busy.items(), key=lambda kv: -kv[1])[:40]:
        sys.stderr.write(f"BENCH profile {k} {where}\n")

def sampler(main):
    # Its errors are written once each, not left to end the thread unseen.
    import traceback
    told = set()
    while True:
        try:
            sample(main)
        except Exception as exc:
            if type(exc) not in told:
                told.add(type(exc))
                where = traceback.format_exc().replace("\n", " | ")
                sys.stderr.write(f"BENCH sampler error {where}\n")

seen = [(0, 0)]
last = [0.0]

def sample(main):
    while True:
        time.sleep(0.005)
        n, start = running[0], running[1]
        now = time.perf_counter()
        if now - last[0] >= 0.01:
            last[0] = now
            ticks[0] += 1
            if start:
                ticks[1] += 1
                where = profile(sys._current_frames().get(main))
                busy[where] = busy.get(where, 0) + 1
        if not start:
            continue
        k = int((time.perf_counter() - start) / slow)
        if k and (n, k) != seen[0]:
            seen[0] = (n, k)
            frame = sys._current_frames().get(main)
            where = []
            while frame is not None and len(where) < 40:
                code = frame.f_code
                where.append(f"{code.co_filename}:{frame.f_lineno}:{code.co_name}")
                frame = frame.f_back
            sys.stderr.write(f"BENCH stack #{n} at {k * slow:.2f} " + " < ".join(where) + "\n")

asyncio.events.Handle._run = timed_run
import atexit
atexit.register(report)
threading.Thread(target=sampler, args=(threading.get_ident(),), daemon=True).start()
asyncio.set_event_loop_policy(SlowCallbackPolicy())
sys.argv = ["deployd", *sys.argv[3:]]
from daemon.cli import main
sys.exit(main())
"""

SLOW = re.compile(r"Executing (?P<what>.*?) took (?P<secs>[0-9.]+) seconds")


def command(debug: bool, *args: str) -> list[str]:
    """The argv that runs `deployd *args` under the wrapper."""
    return [sys.executable, "-c", WRAPPER, str(SLOW_SECONDS), "debug" if debug else "-", *args]


def short(frame: str) -> str:
    """A stack frame FILE:LINE:NAME with FILE from the package down."""
    path, line, name = frame.rsplit(":", 2)
    for root in ("/daemon/", "/site-packages/", "/python3.11/"):
        if root in path:
            path = root.strip("/").replace("python3.11", "stdlib") + "/" + path.split(root, 1)[1]
            break
    return f"{path}:{line} {name}"


def slow_callbacks(log: Path, since: int) -> None:
    """asyncio's slow-callback warnings, and the wrapper's CPU times and stack samples."""
    text = log.read_text(errors="replace")[since:]
    found = [(float(m["secs"]), m["what"]) for m in SLOW.finditer(text)]
    timed = [float(m[1]) for m in re.finditer(r"BENCH slow #\d+ wall ([0-9.]+)", text)]
    print(
        f"\nslow event-loop callbacks (over {SLOW_SECONDS * 1000:.0f} ms): {len(found)} "
        f"asyncio debug warnings; {len(timed)} timed by the wrapper"
        + (f", worst {max(timed) * 1000:.0f} ms, total {sum(timed):.2f} s" if timed else "")
    )
    if found:
        print(f"  worst {max(found)[0] * 1000:.0f} ms; total {sum(s for s, _ in found):.2f} s")
    kinds: dict[str, list[float]] = {}
    for secs, what in found:
        # "<Task ... coro=<NAME() running at FILE:LINE>": where the task stopped next
        coro = re.search(r"coro=<([\w.<>]+)\(\) (?:running at (\S+?)>|done)", what)
        cb = re.search(r"<(?:TimerHandle|Handle) (?:when=\S+ )?([^\s(]+)", what)
        if coro:
            key = coro.group(1) + (
                f" (then at {short(coro.group(2) + ':?')})" if coro.group(2) else " (finished)"
            )
        else:
            key = cb.group(1) if cb else what[:80]
        kinds.setdefault(key.replace(":? ?)", ")"), []).append(secs)
    print("  by callback (asyncio's handle names):")
    for key, times in sorted(kinds.items(), key=lambda kv: -max(kv[1]))[:15]:
        print(f"  {len(times):4d} x  worst {max(times) * 1000:6.0f} ms  {key}")
    timing = {
        int(m[1]): (float(m[2]), float(m[3]))
        for m in re.finditer(r"BENCH slow #(\d+) wall ([0-9.]+) cpu ([0-9.]+)", text)
    }
    if timing:
        wall = sum(w for w, _ in timing.values())
        cpu = sum(c for _, c in timing.values())
        print(
            f"  CPU on the loop's thread during them: {cpu:.2f} s of {wall:.2f} s wall "
            f"({cpu / wall * 100:.0f} %; the rest the thread waited or the OS ran others)"
        )
    first: dict[int, list[str]] = {}
    for m in re.finditer(r"BENCH stack #(\d+) at [0-9.]+ (.*)", text):
        first.setdefault(int(m[1]), m[2].split(" < "))
    if timing:
        print("  the worst, with CPU on the loop's thread and its stack at 50 ms (project frames):")
        for n, (w, c) in sorted(timing.items(), key=lambda kv: -kv[1][0])[:12]:
            frames = first.get(n, [])
            ours = [short(f) for f in frames if "/daemon/" in f or "/site-packages/" in f][:4]
            inner = short(frames[0]) if frames else "(not sampled)"
            print(
                f"  {w * 1000:5.0f} ms (CPU {c * 1000:3.0f} ms)  {inner}  <  " + "  <  ".join(ours)
            )
    stacks: dict[str, list[float]] = {}
    for m in re.finditer(r"BENCH stack #(\d+) at [0-9.]+ (.*)", text):
        n, frames = int(m[1]), m[2].split(" < ")
        ours = [short(f) for f in frames if "/daemon/" in f][:3]
        inner = short(frames[0])
        key = inner + ("  <  " + "  <  ".join(ours) if ours else "")
        stacks.setdefault(key, []).append(timing.get(n, (0.0, 0.0))[0])
    if stacks:
        print("  where the loop's thread was, sampled every 50 ms of a slow callback:")
        for key, times in sorted(stacks.items(), key=lambda kv: -len(kv[1]))[:15]:
            print(f"  {len(times):4d} samples, worst callback {max(times) * 1000:5.0f} ms: {key}")


def loop_profile(log: Path) -> None:
    """Where the loop's thread was inside callbacks (every 10 ms, the whole run)."""
    text = log.read_text(errors="replace")
    head = re.search(r"BENCH profile (\d+) samples, (\d+) inside callbacks", text)
    if head is None:
        print("\nno loop profile (the daemon did not exit cleanly)")
        return
    for m in re.finditer(r"BENCH sampler error (.*)", text):
        print(f"\nthe stack sampler failed (it went on): {m[1][-300:]}")
    total, inside = int(head[1]), int(head[2])
    print(
        f"\nthe loop's thread, sampled every 10 ms: inside a callback {inside} of {total} "
        f"samples ({inside / max(1, total) * 100:.0f} %); where (innermost project frame):"
    )
    for m in list(re.finditer(r"BENCH profile (\d+) (/\S+)", text))[:20]:
        print(f"  {int(m[1]) / max(1, inside) * 100:5.1f} %  {short(m[2])}")
