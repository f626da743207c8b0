"""Safetensors files read and written one group of tensors at a time: the model folders a streamed run reads
block by block, and the shards it writes.

The format: 8 bytes little-endian N, N bytes of JSON header {name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}, then the tensors' bytes back to back (offsets count from the end of the header).
A model folder holds one ``model.safetensors`` or the shards that ``model.safetensors.index.json`` maps every
tensor name to (its ``weight_map``). Reads go straight from the file into the tensor's memory (no memory map,
no copy); writes stream each tensor's bytes into a temporary file that is renamed at the end
(:func:`magr.pipeline.persistence.atomic_open`), hashing them on the way.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .persistence import PARAMS_FILE, atomic_open, write_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
CHUNK = 64 << 20  # bytes per read or write call


def read_header(path) -> tuple[int, dict]:
    """(offset of the data, header without ``__metadata__``) of a safetensors file; ValueError saying what is
    wrong when the header cannot be read (too short, truncated, not JSON)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"only {size} bytes: too short for a safetensors header (8 bytes of length, then JSON)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ValueError(f"truncated: the header alone needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("its header is not valid JSON (not a safetensors file, or damaged)") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not valid JSON (not a safetensors file, or damaged)")  # noqa: TRY004
    header.pop("__metadata__", None)
    return 8 + n, header


def folder_files(folder) -> list[Path]:
    """The safetensors files of a model folder: the shards named in model.safetensors.index.json, else every
    *.safetensors beside config.json. A shard the index names that is missing is a FileNotFoundError."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"model weight index {index} is damaged (no valid weight_map); re-download or re-save "
                         "the model") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"model weight shard {folder / missing[0]} named in {index} is missing "
                                f"({len(missing)} of {len(shards)} shards); re-download the model")
    return [folder / s for s in shards]


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and byte range in the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class TensorFiles:
    """The tensors of some safetensors files by name, read on demand (only the names asked for)."""

    def __init__(self, paths):
        self.entries: dict[str, Entry] = {}
        for path in map(Path, paths):
            start, header = read_header(path)
            for name, h in header.items():
                if h["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {name} has dtype {h['dtype']}; allowed: {', '.join(DTYPES)}")
                begin, end = (start + int(x) for x in h["data_offsets"])
                self.entries[name] = Entry(path, DTYPES[h["dtype"]], tuple(h["shape"]), begin, end)

    @classmethod
    def of_folder(cls, folder) -> TensorFiles:
        """The model weights of a folder (a run folder's grids file left out)."""
        return cls(p for p in folder_files(folder) if p.name != PARAMS_FILE)

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, names=None) -> int:
        return sum(self.entries[n].end - self.entries[n].begin for n in (self.entries if names is None else names))

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (CPU), floating ones cast to ``dtype`` when given; KeyError for a missing name."""
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"{len(missing)} tensor(s) not in the model's weight files, e.g. {missing[0]}")
        by_file = defaultdict(list)
        for name in names:
            by_file[self.entries[name].path].append(name)
        out = {}
        for path, group in by_file.items():
            with open(path, "rb", buffering=0) as f:
                for name in sorted(group, key=lambda n: self.entries[n].begin):
                    out[name] = _read_tensor(f, self.entries[name])
        if dtype is not None:
            out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
        return {name: out[name] for name in names}


def _read_tensor(f, e: Entry) -> torch.Tensor:
    t = torch.empty(e.shape, dtype=e.dtype)
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    if len(view) != e.end - e.begin:
        raise ValueError(f"{e.path}: a tensor of shape {e.shape} in {e.dtype} takes {len(view)} bytes, the header "
                         f"says {e.end - e.begin} (damaged file)")
    f.seek(e.begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + CHUNK])
        if not n:
            raise ValueError(f"{e.path} is truncated (damaged file)")
        done += n
    return t


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write ``tensors`` as one safetensors file (atomically) and return the SHA-256 of its bytes."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}; safetensors stores {', '.join(map(str, DTYPE_CODES))}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    sha = hashlib.sha256()
    with atomic_open(path) as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            sha.update(chunk)
        for t in tensors.values():
            data = _bytes_of(t)
            for i in range(0, len(data), CHUNK):
                f.write(data[i : i + CHUNK])
                sha.update(data[i : i + CHUNK])
    return sha.hexdigest()


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a safetensors file and the SHA-256 of the file's bytes (one pass over the file)."""
    start, header = read_header(path)
    entries = sorted(((name, h) for name, h in header.items()), key=lambda kv: kv[1]["data_offsets"][0])
    sha, out = hashlib.sha256(), {}
    with open(path, "rb", buffering=0) as f:
        sha.update(f.read(start))
        for name, h in entries:
            begin, end = (start + int(x) for x in h["data_offsets"])
            if begin != f.tell():
                raise ValueError(f"{path}: the tensors do not lie back to back (not written by magr)")
            t = _read_tensor(f, Entry(Path(path), DTYPES[h["dtype"]], tuple(h["shape"]), begin, end))
            sha.update(_bytes_of(t))
            out[name] = t
        if f.read(1):
            raise ValueError(f"{path} has bytes past its last tensor (damaged)")
    return out, sha.hexdigest()


def shard_name(i: int, n: int) -> str:
    """The name of shard ``i`` (0-based) of ``n``, as Hugging Face names them: model-00001-of-00031.safetensors."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(folder, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: every tensor name -> the shard holding it (atomically)."""
    write_json(Path(folder) / INDEX_FILE, {"metadata": {"total_size": total_size},
                                           "weight_map": dict(sorted(weight_map.items()))})


def write_sharded(folder, shards: Iterable[dict[str, torch.Tensor]], n: int) -> None:
    """Write each dict of ``shards`` (``n`` of them, made one at a time) as shard i of n, then the index naming
    them (:func:`write_index`)."""
    folder, weight_map, total = Path(folder), {}, 0
    for i, tensors in enumerate(shards):
        write_safetensors(folder / shard_name(i, n), tensors)
        weight_map.update(dict.fromkeys(tensors, shard_name(i, n)))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(folder, weight_map, total)
