"""Compiled coordinate-descent sweep: the passes of :func:`magr.refinement.cd_refine` in one kernel call per layer.

The same sequence of exact column minimisations as the pure-torch loop (the reference), organised for speed:
rows are independent problems, so each row keeps its targets

    t = P[r, :] - Q[r, :] @ N        (N with zero diagonal; double precision)

and updates them only when a code actually changes, t -= (new - old) * N[j, :]; a pass then costs
O(out x in) plus O(changes x in), and a row whose pass changed nothing has converged and stops. The start
targets come from one matmul, T = (W - Q) @ N + W * diag(N_full) (= P - Q @ N). Float operations happen in
another order than in the reference, so a code can differ where the target lies on a rounding tie
(tests/test_cd_sweep.py counts and checks them).

Backends: on the CPU a C kernel (magr/csrc/cd_sweep.c) built on first use with the system C compiler
(``cc``; ``CC`` overrides) into a cache folder (``MAGR_CACHE_DIR``, default ~/.cache/magr), loaded with ctypes
and run on torch's thread count (row chunks in threads; the call releases the GIL). On CUDA the Triton kernel
of :mod:`magr.cd_triton`. When neither is available, :func:`compiled_sweep` says why and
:class:`magr.refinement.CD` falls back to the pure-torch loop with a logged warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cd_sweep.c"
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
TILE = 8  # rows per tile: one row N[j, :] serves the tile's rows that changed at column j


class Unavailable(RuntimeError):
    """The compiled sweep cannot run here (no compiler, build failed, no Triton on CUDA)."""


def cache_dir() -> Path:
    """Where built kernels are kept: $MAGR_CACHE_DIR, else $XDG_CACHE_HOME/magr or ~/.cache/magr."""
    if os.environ.get("MAGR_CACHE_DIR"):
        return Path(os.environ["MAGR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magr"


def _cpu_signature() -> str:
    """The CPU model and flags (a -march=native build runs only where it was built)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _native_flag(cc: str) -> list[str]:
    """-march=native when the compiler accepts it (vector instructions of this CPU; no FMA contraction)."""
    ok = subprocess.run([cc, "-march=native", "-E", "-x", "c", "-"], input="", capture_output=True, text=True)
    return ["-march=native"] if ok.returncode == 0 else []


def _compiler() -> str:
    """The C compiler: $CC, else cc or gcc on PATH."""
    name = os.environ.get("CC")
    cc = shutil.which(name) if name else (shutil.which("cc") or shutil.which("gcc"))
    if not cc:
        raise Unavailable(f"C compiler CC={name!r} not found" if name else "no C compiler found (cc or gcc; set CC)")
    return cc


def build(force: bool = False) -> Path:
    """Compile magr/csrc/cd_sweep.c into the cache folder (once per source, compiler and CPU); return its path."""
    cc = _compiler()
    flags = CFLAGS + _native_flag(cc)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, *flags, _cpu_signature()]).encode()).hexdigest()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"cd_sweep-{key[:16]}.so"
    if lib.exists() and not force:
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # build aside, then rename: parallel builds are safe
    os.close(fd)
    log.info("building the coordinate-descent kernel: %s %s", cc, " ".join(flags))
    done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise Unavailable(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, lib)
    return lib


@lru_cache(maxsize=1)
def _library():
    """The loaded C kernel (ctypes); raises :class:`Unavailable` with the reason."""
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError as e:  # no writable cache folder, a compiler that cannot run, a library that cannot load
        raise Unavailable(f"could not build or load the kernel: {e}") from e
    fn = lib.magr_cd_sweep
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_float, i64, i64, i64, ptr]
    fn.restype = i64
    return fn


def _check(name: str, x: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if x.dtype != dtype or tuple(x.shape) != shape or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}; got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device} (contiguous: {x.is_contiguous()})")


def sweep_cpu(Q, T, N, scale, zero, g_idx, refit_group: int, beta: float, maxq: int, sym: bool, passes: int,
              threads: int | None = None) -> torch.Tensor:
    """In place on Q (out x in, float32), T (targets, float64) and, when refitting, scale/zero (out x groups).

    N (in x in, float32) has a zero diagonal; g_idx (in, int64) maps columns to groups; ``refit_group`` g > 0
    re-fits the grid of each group of g columns at its first column in every pass (0: keep the grids).
    Returns the passes each row swept (int64, out): fewer than ``passes`` where the row converged.
    """
    fn = _library()
    out, n = Q.shape
    _check("Q", Q, torch.float32, (out, n))
    _check("T", T, torch.float64, (out, n))
    _check("N", N, torch.float32, (n, n))
    _check("scale", scale, torch.float32, (out, scale.shape[1]))
    _check("zero", zero, torch.float32, tuple(scale.shape))
    _check("g_idx", g_idx, torch.int64, (n,))
    ran = torch.zeros(out, dtype=torch.int64)
    groups = scale.shape[1]
    threads = threads or torch.get_num_threads()
    chunk = max(TILE, -(-out // (4 * threads)) // TILE * TILE)  # a few chunks per thread balance converging rows

    def run(r0: int) -> int:
        r1 = min(r0 + chunk, out)
        return fn(r1 - r0, n, TILE, Q[r0].data_ptr(), T[r0].data_ptr(), N.data_ptr(), scale[r0].data_ptr(),
                  zero[r0].data_ptr(), groups, g_idx.data_ptr(), refit_group, beta, maxq, int(sym), passes,
                  ran[r0].data_ptr())

    starts = range(0, out, chunk)
    if threads == 1 or len(starts) == 1:
        codes = [run(r0) for r0 in starts]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            codes = list(pool.map(run, starts))
    if any(codes):
        raise MemoryError("the coordinate-descent kernel could not allocate its work buffers")
    return ran


def compiled_sweep(device: torch.device):
    """The compiled sweep function for ``device`` (see :func:`sweep_cpu`); raises :class:`Unavailable`."""
    if device.type == "cpu":
        _library()
        return sweep_cpu
    if device.type == "cuda":
        from .cd_triton import sweep_triton, triton_unavailable

        reason = triton_unavailable()
        if reason:
            raise Unavailable(reason)
        return sweep_triton
    raise Unavailable(f"no compiled coordinate-descent sweep for device {device}")
