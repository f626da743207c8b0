"""Worker processes that share a CPU: the independent pieces of a job (one calibration seed's quantization, one
evaluation set of a model) run in ``workers`` spawned processes of one thread each.

Why processes: on a small CPU, two one-thread processes get more done than one process with two threads (2-core
AMD EPYC, one OPTQ W4 seed of SmolLM2-135M with its two perplexity sets: 81 s at two threads; two seeds side by
side at one thread each: 112 and 114 s for both; benchmarks/NOTES.md "Workers"). Why one thread: a run's numbers
then no longer depend on the machine's core count, which torch's default (one thread per core) makes them do:
bfloat16 forwards round differently with the thread count (the same seed at one and at two threads: WikiText-2
perplexity 66.92 vs 65.08). Every task runs at one thread, so a job's numbers are those of the one-thread
sequential job, whatever the schedule and whatever ``workers``: :func:`one_thread` gives that sequential job.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


def check_workers(workers, device) -> int:
    """``workers`` as an int >= 1; more than one only on a CPU (on a GPU the processes would share one device)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} not understood; allowed: an integer >= 1 (1: one process)")
    if workers > 1 and torch.device(device).type != "cpu":
        raise ValueError(f"workers={workers} shares a CPU between processes; on device {device} use workers=1")
    return workers


def one_thread() -> None:
    """This process's torch work on one thread (what every worker runs with)."""
    torch.set_num_threads(1)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _start(level: int) -> None:
    """A worker: the caller's log level, one thread, no progress bars of its own (the caller shows the tasks), and
    SIGTERM unwinding like Ctrl-C, so a stopped task releases its run lock and keeps its finished blocks."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["TQDM_DISABLE"] = "1"
    signal.signal(signal.SIGTERM, _interrupted)
    one_thread()


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned one-thread processes (spawn: no fork of a process whose OpenMP threads
    exist). On an error or an interrupt (Ctrl-C, SIGTERM) the queued tasks are cancelled and the running ones
    stopped: what they finished is in their block checkpoints (written atomically), which a rerun resumes."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start, initargs=(logging.getLogger().getEffectiveLevel(),))
    try:
        yield pool
    except BaseException:
        processes = list((pool._processes or {}).values())  # private: no public way before Python 3.14
        for process in processes:
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(60)  # the task unwinds at its next Python step (after the matmul it is in)
            if process.is_alive():  # e.g. held at exit by a result its queue could not flush
                process.kill()
                process.join(10)  # reaped: no child left behind
                if process.is_alive():
                    log.warning("worker %s (pid %s) did not exit after SIGKILL", process.name, process.pid)
        raise
    pool.shutdown(wait=True)
