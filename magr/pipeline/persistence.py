"""What a run leaves on disk: block checkpoints (resume), the quantized model, its grids, and run metadata.

A run folder holds
- ``magr_run.json``: the run's metadata, the one file that describes it (model, settings, calibration,
  evaluation, perplexities, seconds), written by :func:`write_run` and read by :func:`read_run`;
- ``magr_layers.json``: one record per linear layer (row maxima before/after MagR, errors, seconds);
- with the model saved: a ``save_pretrained`` folder (de-quantized weights in the model's dtype) and
  ``magr_qparams.safetensors`` (scale, zero, g_idx of every layer: the integer codes are
  round(w / scale) + zero);
- ``.blocks/``: one checkpoint per finished block while the run goes on (:mod:`magr.pipeline.checkpoints`), removed
  after success unless kept;
- ``.magr.lock`` while a run writes into the folder (:func:`run_lock`): the holder's pid, host, start time and
  command, so that a second run into the same folder refuses instead of overwriting the first one's files.

Every file is written atomically (:func:`atomic_open`: a temporary name in the same folder, fsync, rename), so
a crash, a full disk or a kill leaves either the old file or the new one, never a truncated one; JSON is
strict (no bare NaN: a non-finite number is written as null, with a warning naming it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..core.quantizers import QuantParams

log = logging.getLogger(__name__)

RUN_FILE = "magr_run.json"
RECORDS_FILE = "magr_layers.json"
PARAMS_FILE = "magr_qparams.safetensors"
CHECKPOINT_FOLDER = ".blocks"
LOCK_FILE = ".magr.lock"
#: What marks a folder as a run folder (one that ``magr quantize --out`` may write into again).
RUN_MARKERS = (RUN_FILE, RECORDS_FILE, PARAMS_FILE, CHECKPOINT_FOLDER, LOCK_FILE)
#: The metadata files of run folders written by magr before ``magr_run.json`` existed (commit e660314).
OLD_RUN_FILES = ("magr_quantization.json", "magr_summary.json")


# -------------------------------------------------------------------------------------- atomic writes
def fsync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it to ``path``.

    On any error (a full disk, Ctrl-C) the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. ENOSPC from write(): name the file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    fsync_folder(path.parent)


def strict(obj, where: str = "$"):
    """``obj`` with every non-finite float replaced by None (JSON null), each one logged with its place."""
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("non-finite value %s at %s written as null", obj, where)
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps(obj, indent: int = 1) -> str:
    """Strict JSON text of ``obj`` (:func:`strict`; other objects as their str)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False, default=str)


# ------------------------------------------------------------------------------------------ run folders
def write_json(path, obj) -> None:
    """Write ``obj`` as strict JSON (:func:`dumps`), atomically, creating the folder."""
    text = dumps(obj) + "\n"
    with atomic_open(path, "w") as f:
        f.write(text)


def is_run_folder(folder) -> bool:
    """Whether ``folder`` holds a (finished or interrupted) run: one of :data:`RUN_MARKERS`."""
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


#: The weight files of a saved model: one file, or shards and their index (written by a streamed run).
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def retire_run(folder) -> None:
    """Remove a finished run's metadata and weight files before its outputs are rewritten: until the new
    ``magr_run.json`` is written, the folder does not pass for a finished run (no mix of old metadata and new
    weights, nor of one run's single weight file and another's shards)."""
    folder = Path(folder)
    (folder / RUN_FILE).unlink(missing_ok=True)
    for pattern in WEIGHT_FILES:
        for old in folder.glob(pattern):
            old.unlink()
    for leftover in folder.glob(".staging-*"):  # from a save killed half-way
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staged_folder(out, last: tuple[str, ...] = ()):
    """A temporary folder inside ``out`` to write several files into; on success each file is fsynced and
    renamed into ``out`` (each one atomically), the names in ``last`` after all others (an index after the
    files it names); on error the staging folder is removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield stage
        for f in sorted(stage.iterdir(), key=lambda f: (f.name in last, f.name)):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(f, out / f.name)
        fsync_folder(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_run(folder, meta: dict, records: list[dict] | None = None) -> None:
    """Write a run's metadata (and its per-layer records)."""
    write_json(Path(folder) / RUN_FILE, meta)
    if records is not None:
        write_json(Path(folder) / RECORDS_FILE, records)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged (not valid JSON: {exc}); rerun the command that wrote it") from None


def missing_run_file(folder) -> Exception:
    """The error for a folder without ``magr_run.json``: an older magr's run format (ValueError: quantize
    again into a new folder, the old one is kept), a run stopped before its metadata was written (rerun its
    command), or no run at all (FileNotFoundError)."""
    folder = Path(folder)
    old = [name for name in OLD_RUN_FILES if (folder / name).is_file()]
    if old:
        source = _old_source(folder / old[0])
        again = f"`magr quantize --model {source} ... --out NEW_FOLDER`" if source else "`magr quantize ... --out NEW_FOLDER`"
        return ValueError(f"{folder} is a run folder of an older magr ({old[0]}, no {RUN_FILE}): this magr reads only "
                          f"the run format with {RUN_FILE}; quantize the model again into a new folder, {again}, "
                          "and use that one (the old folder is left as it is)")
    if any((folder / name).exists() for name in (PARAMS_FILE, RECORDS_FILE, CHECKPOINT_FOLDER)):
        return ValueError(f"{folder} holds an unfinished run (no {RUN_FILE}: stopped before its metadata was "
                          "written): rerun the `magr quantize` command that wrote it to finish it")
    return FileNotFoundError(f"no {RUN_FILE} in {folder}: not a run folder; give the --out folder of a finished "
                             "`magr quantize` run")


def _old_source(path: Path) -> str | None:
    """The source model named in an older run format's metadata, if readable."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("source_model") or meta.get("model")
    return str(source) if source else None


def read_run(folder) -> dict:
    """A run's metadata with its per-layer records under ``"records"`` and the folder name under ``"name"``;
    without ``magr_run.json``, the error of :func:`missing_run_file`."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.is_file():
        raise missing_run_file(folder)
    run = _read_json(path)
    rec = folder / RECORDS_FILE
    run["records"] = _read_json(rec) if rec.is_file() else []
    run["name"] = folder.name
    return run


def save_quantized(model: nn.Module, tokenizer, params: dict[str, QuantParams], out_dir) -> Path:
    """Save the quantized model as a ``save_pretrained`` folder (de-quantized weights) plus its grids."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with staged_folder(out) as stage:  # every file appears complete or not at all
        model.save_pretrained(stage)
        save_tokenizer(tokenizer, stage)
        save_file(grid_tensors(params), str(stage / PARAMS_FILE))
    return out


def grid_tensors(params: dict[str, QuantParams]) -> dict[str, torch.Tensor]:
    """The tensors of ``magr_qparams.safetensors``: ``<layer>.scale``, ``.zero`` and ``.g_idx`` (int32)."""
    tensors = {}
    for name, p in params.items():
        tensors[f"{name}.scale"] = p.scale.contiguous()
        tensors[f"{name}.zero"] = p.zero.contiguous()
        tensors[f"{name}.g_idx"] = p.g_idx.to(torch.int32).contiguous()
    return tensors


def save_tokenizer(tokenizer, out) -> None:
    """``tokenizer.save_pretrained(out)``; a tokenizer that cannot be saved (a wrapper) is logged, not fatal."""
    try:
        tokenizer.save_pretrained(out)
    except Exception as exc:  # reload it by alias
        log.warning("tokenizer not saved (%s); load it from the source model", exc)


def load_quant_params(folder) -> dict[str, QuantParams]:
    """The grids written by :func:`save_quantized`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    maxq = 2 ** read_run(folder)["config"]["grid"]["bits"] - 1
    tensors = load_file(str(folder / PARAMS_FILE))
    return {key[: -len(".scale")]: QuantParams(tensors[key], tensors[key[:-6] + ".zero"], maxq,
                                                tensors[key[:-6] + ".g_idx"].long())
            for key in tensors if key.endswith(".scale")}


# -------------------------------------------------------------------------------------------- locking
def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0: no signal is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # being written this very moment, or damaged
        return {}


def lock_problem(folder) -> str | None:
    """Why ``folder`` cannot be locked now, or None: held by a running process (its pid, host, start and
    command), or a stale lock of a process that no longer runs (killed: SIGKILL, a crash of the machine)."""
    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return None
    holder = _read_lock(path)
    pid, host = holder.get("pid"), holder.get("host")
    since = holder.get("started", "an unknown time")
    who = f"pid {pid} on {host}, started {since}: {holder.get('command', '?')}"
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        return (f"stale lock {path} of a run that no longer runs ({who}); it was killed before it could release "
                f"the folder. If no magr run writes into {folder}, delete the lock (rm {path}) and rerun: an "
                "interrupted run resumes from its block checkpoints")
    return (f"{folder} is being written by another magr run ({who}); wait for it to finish or give another "
            f"--out (if that run is gone, delete {path})")


@contextmanager
def run_lock(folder):
    """Hold ``folder/.magr.lock`` (created atomically with O_EXCL; it holds this process's pid, host, start
    time and command) for the ``with`` block; released on every exit, errors and Ctrl-C included. A lock
    held by another run, or left by a killed one, is a ValueError (:func:`lock_problem`), never taken over.
    A folder that this call created and that is still empty at the end is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["magr"] + sys.argv[1:]) if sys.argv else "magr"}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ValueError(lock_problem(folder) or f"{path} appeared and vanished; rerun") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder) + "\n")
    try:
        yield path
    finally:
        if _read_lock(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()  # only if empty: a run refused before writing anything leaves no folder
            except OSError:
                pass
