"""Small C kernels for the CPU: built on first use, loaded with ctypes, run over row chunks in threads.

Each kernel is one C file in magr/core/csrc (it may include the shared headers there, e.g. ``grid.h``, the grid
formulas of :mod:`magr.core.quantizers` in float32). :func:`build` compiles it with the system C compiler (``cc``;
``CC`` overrides) into a cache folder (``MAGR_CACHE_DIR``, default ~/.cache/magr), once per source (the file
and every header), compiler and CPU; :func:`load` opens it. The flags keep IEEE arithmetic
(``-ffp-contract=off -fno-fast-math``: no fused multiply-add, every float operation the one written), so a
kernel can reproduce torch's elementwise float32 operations to the bit. ctypes releases the GIL during a
call, so :func:`over_row_chunks` runs independent row chunks on torch's thread count.

When a kernel cannot run here (no compiler, a failed build, no writable cache) :class:`Unavailable` says
why, and :func:`choose` picks the pure-torch implementation instead, with a logged warning.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .settings import check_choice

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
BACKENDS = ("auto", "compiled", "torch")


class Unavailable(RuntimeError):
    """A compiled kernel cannot run here (no compiler, build failed, no kernel for the device)."""


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


def _source_text(source: Path) -> str:
    """The kernel's source and every shared header (a changed header rebuilds every kernel)."""
    headers = sorted(CSRC.glob("*.h"))
    return "\n".join([source.read_text(), *(h.read_text() for h in headers)])


def build(source: Path, force: bool = False) -> Path:
    """Compile ``source`` (a C file in magr/core/csrc) into the cache folder, once per source, compiler and CPU;
    return the shared library's path. Raises :class:`Unavailable` when the compiler is missing or fails."""
    cc = _compiler()
    flags = CFLAGS + _native_flag(cc)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([_source_text(source), cc, version, *flags, _cpu_signature()]).encode())
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists() and not force:
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # build aside, then rename: parallel builds are safe
    os.close(fd)
    log.info("building the %s kernel: %s %s", source.stem, cc, " ".join(flags))
    done = subprocess.run([cc, *flags, f"-I{CSRC}", str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise Unavailable(f"{cc} failed to build {source.name}: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, lib)
    return lib


def load(source: Path, symbol: str, argtypes: list, restype=ctypes.c_int64):
    """The function ``symbol`` of the built ``source`` (ctypes, GIL released during calls); raises
    :class:`Unavailable` with the reason. Callers cache it (``functools.lru_cache``)."""
    try:
        lib = ctypes.CDLL(str(build(source)))
    except OSError as e:  # no writable cache folder, a compiler that cannot run, a library that cannot load
        raise Unavailable(f"could not build or load the {source.stem} kernel: {e}") from e
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def check_tensor(name: str, x: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    """ValueError unless ``x`` is a contiguous CPU tensor of ``dtype`` and ``shape`` (what a kernel reads)."""
    if x.dtype != dtype or tuple(x.shape) != shape or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}; got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device} (contiguous: {x.is_contiguous()})")


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process id, threads): a forked child makes its own


def over_row_chunks(run: Callable[[int, int], int], rows: int, chunk: int, threads: int | None = None) -> None:
    """``run(r0, r1)`` for the chunks [r0, r1) of ``chunk`` rows, in a pool of ``threads`` threads (default:
    torch's thread count; one chunk or one thread: in this thread). A nonzero return is a failed allocation."""
    threads = threads or torch.get_num_threads()
    starts = range(0, rows, chunk)
    if threads == 1 or len(starts) == 1:
        codes = [run(r0, min(r0 + chunk, rows)) for r0 in starts]
    else:
        key = (os.getpid(), threads)
        pool = _pools.get(key) or _pools.setdefault(key, ThreadPoolExecutor(max_workers=threads))
        codes = list(pool.map(lambda r0: run(r0, min(r0 + chunk, rows)), starts))
    if any(codes):
        raise MemoryError("a compiled kernel could not allocate its work buffers")


_warned: set[str] = set()


def choose(setting: str, backend: str, device: torch.device, probe: Callable, compiled: Callable,
           reference: Callable, what: str, logger: logging.Logger = log) -> Callable:
    """``compiled`` or ``reference`` (the pure-torch loop) for ``backend`` of the setting named ``setting``:
    "torch" the reference; "compiled" the compiled one, or a RuntimeError naming why it cannot run here;
    "auto" the compiled one when ``probe(device)`` succeeds, else the reference with a warning (once per
    reason) naming ``what`` and the reason."""
    check_choice(setting, backend, BACKENDS)
    if backend == "torch":
        return reference
    try:
        probe(torch.device(device))
        return compiled
    except Unavailable as e:
        if backend == "compiled":
            raise RuntimeError(f"{setting}='compiled' cannot run on {device}: {e}; use {setting}=torch") from e
        if str(e) not in _warned:
            _warned.add(str(e))
            logger.warning("compiled %s unavailable (%s); using the pure-torch loop", what, e)
        return reference
