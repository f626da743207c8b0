"""Run ``magr`` with one injected fault at block K (tests/test_faults.py), in a process of its own:

    python tests/fault_runner.py FAULT K -- quantize --model ... --out ...

FAULT is one of
- ``kill-after``: SIGKILL right after block K's checkpoint is complete (a crash or an OOM kill between blocks);
- ``kill-mid-write``: SIGKILL after half of block K's .pt file is written (a kill during a write);
- ``enospc``: half of block K's .json file is written, then the write fails with ENOSPC (a full disk).

The write faults wrap the ``open`` that :mod:`magr.pipeline.persistence` writes files with, so the library's own
write path (temporary name, fsync, rename) is what they hit.
"""
from __future__ import annotations

import builtins
import errno
import os
import signal
import sys

import torch


class _HalfWriter:
    """A file whose first write stores half the data, then kills the process or raises ENOSPC."""

    def __init__(self, f, fault: str):
        self._f, self._fault = f, fault

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._fault == "kill-mid-write":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def inject(fault: str, block: int) -> None:
    from magr.pipeline import checkpoints, persistence

    if fault == "kill-after":
        save = checkpoints.BlockCheckpoints.save

        def save_then_die(self, i, *args):
            save(self, i, *args)
            if i == block:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoints.BlockCheckpoints.save = save_then_die
        return
    suffix = {"kill-mid-write": ".pt", "enospc": ".json"}[fault]

    def faulty_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and f"block_{block:03d}{suffix}" in os.path.basename(str(path)):
            return _HalfWriter(f, fault)
        return f

    persistence.open = faulty_open  # shadows the builtin inside magr.pipeline.persistence only


if __name__ == "__main__":
    fault, block, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: fault_runner.py FAULT K -- magr arguments"
    torch.set_num_threads(1)
    inject(fault, int(block))
    from magr.cli import main

    sys.exit(main(argv))
