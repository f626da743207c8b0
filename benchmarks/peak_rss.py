"""Run a command under a resident-memory limit and report its peak resident memory (RSS), sampled.

    python benchmarks/peak_rss.py --limit-gib 16 --log run.rss.jsonl -- magr quantize ...

Every ``--interval`` seconds the RSS of the command and all its child processes is summed (psutil); above
``--limit-gib`` the whole process group is killed (SIGKILL) at once, so a run that does not fit fails under the
limit instead of driving the machine into its out-of-memory killer (which may pick another job). The last line
printed is JSON: command, return code, wall seconds, peak RSS (GiB), and whether the limit killed it; ``--log``
also gets one line per second of the RSS timeline. ``--summarize LOG --window S`` reads such a timeline back and
prints the highest and lowest logged RSS of every S-second window (a run's blocks, one after another):

    python benchmarks/peak_rss.py --summarize run.rss.jsonl --window 240 [--skip 20]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil

GIB = 2**30


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and its descendants, in bytes (processes that just ended count 0)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(command: list[str], limit: int, interval: float, log=None) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(command, start_new_session=True)  # its own process group: killed as one
    proc = psutil.Process(child.pid)
    peak, killed, last_log = 0, False, 0.0
    while child.poll() is None:
        try:
            rss = tree_rss(proc)
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        now = time.perf_counter() - start
        if rss > limit:
            os.killpg(child.pid, signal.SIGKILL)
            killed = True
            print(f"peak_rss: RSS {rss / GIB:.2f} GiB above the limit {limit / GIB:.2f} GiB after {now:.1f} s: "
                  "killed", file=sys.stderr, flush=True)
        if log is not None and now - last_log >= 1.0:
            log.write(json.dumps({"t": round(now, 1), "rss_gib": round(rss / GIB, 3)}) + "\n")
            log.flush()
            last_log = now
        time.sleep(interval)
    return {"command": command, "returncode": child.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak / GIB, 3), "limit_gib": round(limit / GIB, 2), "killed_at_limit": killed}


def windows(path, window: float, skip: float = 0.0) -> list[dict]:
    """Per ``window`` seconds of a logged timeline from ``skip`` on: its start, the highest and the lowest RSS."""
    parts: dict[int, list[float]] = {}
    for line in open(path):
        r = json.loads(line)
        if r["t"] >= skip:
            parts.setdefault(int((r["t"] - skip) // window), []).append(r["rss_gib"])
    return [{"from_s": skip + k * window, "max_gib": max(v), "min_gib": min(v)} for k, v in sorted(parts.items())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-gib", type=float, help="kill the command above this RSS (required to run one)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples (default 0.05)")
    p.add_argument("--log", default=None, help="write the RSS timeline here (JSON lines)")
    p.add_argument("--summarize", default=None, help="a --log timeline to summarize per --window instead of a run")
    p.add_argument("--window", type=float, default=60.0, help="seconds per window of --summarize")
    p.add_argument("--skip", type=float, default=0.0, help="seconds at the start of the timeline to leave out")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    if args.summarize:
        print("| from s | max RSS GiB | min RSS GiB |\n|---|---|---|")
        for w in windows(args.summarize, args.window, args.skip):
            print(f"| {w['from_s']:g} | {w['max_gib']:.2f} | {w['min_gib']:.2f} |")
        return 0
    if args.limit_gib is None:
        p.error("--limit-gib is required to run a command")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    if args.log:
        with open(args.log, "w") as log:
            out = run(command, int(args.limit_gib * GIB), args.interval, log)
    else:
        out = run(command, int(args.limit_gib * GIB), args.interval)
    print(json.dumps(out))
    return 0 if out["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
