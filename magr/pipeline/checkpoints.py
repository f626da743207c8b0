"""Block checkpoints of a quantization run, and the key that decides whether a rerun may resume them.

Every finished block leaves three files in the checkpoint folder (``OUT/.blocks`` by default):
``block_NNN.safetensors`` (the quantized block's tensors under their model names, ``model.layers.N.*``: a
streamed run links it into the saved model as that block's shard), ``block_NNN.pt`` (its grids) and
``block_NNN.json`` (its key, per-layer records, seconds and the SHA-256 of the other two). All are written
atomically, the .json last, so the .json commits the block. A rerun resumes block i only when

- its key equals this run's key (:func:`resume_key`): the numerics version of the library
  (:data:`NUMERICS_VERSION`) and of torch, the settings (``QuantConfig.fingerprint()``), the calibration
  tokens (SHA-256 of their bytes), the parameter dtype, the device type, the CPU threads, and the model: a chain of SHA-256
  digests over the model's config, its embeddings and blocks 0..i as loaded, so block i's key covers every
  weight its result depends on;
- its files are intact (the JSON parses, the .pt and .safetensors have the recorded digests, the tensors fit
  the block);
- every block before it was resumed too: resumed blocks form a prefix, and once a block is recomputed every
  later checkpoint is discarded, so a result never mixes two runs.

Policies (``resume``): ``auto`` resumes what matches and starts afresh, with a warning naming what differs,
at the first block that does not; ``never`` discards the old checkpoints first; ``force`` resumes blocks
whose key differs too (with the same warning), for a change known not to matter. Damaged files are
named in a warning, discarded and recomputed under every policy.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .persistence import atomic_open, write_json
from .shards import read_safetensors, write_safetensors
from ..core.quantizers import QuantParams
from ..core.settings import check_choice

log = logging.getLogger(__name__)

NUMERICS_VERSION = 2
"""Version of the numbers the library computes. Bump it with every change that alters a quantized block
(a solver, a quantizer, the statistics, the block walk), so that checkpoints of older code are not resumed."""

RESUME_POLICIES = ("auto", "never", "force")

_FIELDS = {"numerics": "library numerics version", "settings": "settings", "calibration": "calibration tokens",
           "dtype": "dtype", "forward_dtype": "forward dtype", "device": "device type",
           "threads": "CPU threads (forwards round differently with them)", "model": "model (its config, embeddings or block weights)"}
_SHOWN = ("numerics", "dtype", "forward_dtype", "device", "threads")  # fields whose old and new values are short enough to print
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype")


# ----------------------------------------------------------------------------------------- the key
def digest(named: Iterable[tuple[str, torch.Tensor]], seed: str = "") -> str:
    """SHA-256 over ``seed`` and each tensor's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256(seed.encode())
    for name, t in named:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _config_text(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items()
         if k not in _VOLATILE_CONFIG and not k.startswith("_")}
    return json.dumps(d, sort_keys=True, default=str)


def resume_key(model: nn.Module, cfg, calib: torch.Tensor, device, forward_dtype: torch.dtype | None = None) -> dict:
    """Everything a quantized block depends on except the block weights, which :class:`BlockCheckpoints`
    chains in block by block (``model`` starts as the digest of the config and the embeddings)."""
    dtype = next(model.parameters()).dtype
    embeddings = model.get_input_embeddings().state_dict().items()
    return {"numerics": f"magr {NUMERICS_VERSION}, torch {torch.__version__}",
            "settings": cfg.fingerprint(),
            "calibration": digest([("tokens", calib)]),
            "dtype": str(dtype).removeprefix("torch."),
            "forward_dtype": str(forward_dtype or dtype).removeprefix("torch."),
            "device": torch.device(device).type,
            "threads": torch.get_num_threads() if torch.device(device).type == "cpu" else None,
            "model": digest(embeddings, seed=_config_text(model))}


def _differences(old: dict, new: dict) -> str:
    parts = []
    for k, label in _FIELDS.items():
        if old.get(k) != new.get(k):
            parts.append(f"{label} ({old.get(k)} -> {new.get(k)})" if k in _SHOWN else label)
    return ", ".join(parts)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------- the folder
class BlockCheckpoints:
    """The checkpoints of one run in ``folder``. Per block, in order: :meth:`load` (None: quantize it),
    then :meth:`save` for a block that was quantized."""

    def __init__(self, folder, key: dict, resume: str = "auto"):
        check_choice("resume", resume, RESUME_POLICIES)
        self.folder, self.key, self.policy = Path(folder), dict(key), resume
        self.resuming = resume != "never"
        self.resumed: list[int] = []
        self.saved: list[int] = []
        self._chain, self._block_key = key["model"], None
        for tmp in self.folder.glob(".block_*.tmp*"):  # a write that was killed half-way
            tmp.unlink(missing_ok=True)
        if resume == "never":
            n = self._discard_from(0)
            if n:
                log.info("resume=never: %d old block checkpoints in %s discarded", n, self.folder)

    def paths(self, i: int) -> tuple[Path, Path]:
        return self.folder / f"block_{i:03d}.pt", self.folder / f"block_{i:03d}.json"

    def shard(self, i: int) -> Path:
        """Block ``i``'s tensors (safetensors, named ``model.layers.i.*``)."""
        return shard_path(self.folder, i)

    def load(self, i: int, block: nn.Module, device) -> tuple[dict[str, QuantParams], list[dict], float] | None:
        """Block ``i``'s checkpoint loaded into ``block`` (weights as loaded), as (grids, records, seconds),
        or None when there is none to resume. Call it for every block, in order, before quantizing it."""
        state = block.state_dict()
        self._chain = digest(state.items(), seed=self._chain)
        key = self._block_key = {**self.key, "model": self._chain}
        pt, js = self.paths(i)
        if not self.resuming:
            return None
        if not js.exists():
            return self._stop(i)
        try:
            meta = json.loads(js.read_text())
            old_key = meta["key"]
            differ = _differences(old_key, key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._damaged(i, js, exc)
        if differ:
            if self.policy != "force":
                log.warning("%s was made with another %s: not resumed; starting afresh from block %d (this and "
                            "the later checkpoints are discarded; --resume force would use them anyway)", js, differ, i)
                return self._stop(i)
            log.warning("%s was made with another %s: resumed anyway (--resume force)", js, differ)
        try:
            data = pt.read_bytes()
            if _sha256(data) != meta.get("pt_sha256"):
                raise ValueError(f"its content does not match the SHA-256 recorded in {js.name}")
            saved = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
            params = {n: QuantParams(**p) for n, p in saved["params"].items()}
            records, seconds = list(meta["records"]), float(meta["seconds"])
        except Exception as exc:  # anything unreadable is a damaged checkpoint: recompute the block
            return self._damaged(i, pt, exc)
        try:
            tensors, sha = read_safetensors(self.shard(i))
            if sha != meta.get("shard_sha256"):
                raise ValueError(f"its content does not match the SHA-256 recorded in {js.name}")
            prefix = f"model.layers.{i}."
            saved_state = {k.removeprefix(prefix): v for k, v in tensors.items()}
            if {k: tuple(v.shape) for k, v in saved_state.items()} != {k: tuple(v.shape) for k, v in state.items()}:
                raise ValueError("its tensors do not fit this block")
        except Exception as exc:
            return self._damaged(i, self.shard(i), exc)
        block.load_state_dict(saved_state)
        self.resumed.append(i)
        return params, records, seconds

    def save(self, i: int, block: nn.Module, params: dict[str, QuantParams], records: list[dict],
             seconds: float) -> None:
        """Checkpoint quantized block ``i`` (after :meth:`load` returned None for it)."""
        pt, js = self.paths(i)
        buf = io.BytesIO()
        torch.save({"params": {n: asdict(p) for n, p in params.items()}}, buf)
        data = buf.getvalue()
        with atomic_open(pt) as f:
            f.write(data)
        shard_sha = write_safetensors(self.shard(i), {f"model.layers.{i}.{k}": v for k, v in block.state_dict().items()})
        write_json(js, {"key": self._block_key, "pt_sha256": _sha256(data), "shard_sha256": shard_sha,
                        "records": records, "seconds": seconds})
        self.saved.append(i)

    def done(self) -> int:
        """How many blocks, from block 0 on, are checkpointed."""
        have = set(self.resumed) | set(self.saved)
        n = 0
        while n in have:
            n += 1
        return n

    def describe(self) -> str:
        """One line: what is saved and how to resume."""
        n = self.done()
        if n == 0:
            return f"no block finished, nothing saved in {self.folder}"
        done = "block 0 is" if n == 1 else f"blocks 0-{n - 1} are"
        return f"{done} saved in {self.folder}; rerun the same command to resume from block {n}"

    def remove(self) -> None:
        """Delete every checkpoint file (after the run's outputs are written), and the folder if empty."""
        remove_checkpoints(self.folder)

    # -- internals
    def _stop(self, i: int) -> None:
        """Resume nothing from block ``i`` on."""
        self.resuming = False
        self._discard_from(i)
        return None

    def _damaged(self, i: int, path: Path, exc: Exception) -> None:
        log.warning("damaged checkpoint %s (%s: %s): discarded, block %d is recomputed",
                    path, type(exc).__name__, exc, i)
        return self._stop(i)

    def _discard_from(self, i: int) -> int:
        return _discard(self.folder, i)


def shard_path(folder, i: int) -> Path:
    """Block ``i``'s tensors in the checkpoint folder ``folder`` (safetensors, named ``model.layers.i.*``)."""
    return Path(folder) / f"block_{i:03d}.safetensors"


def remove_checkpoints(folder) -> None:
    """Delete every checkpoint file in ``folder``, and the folder if that leaves it empty."""
    _discard(Path(folder), 0)
    try:
        Path(folder).rmdir()
    except OSError:
        pass


def _discard(folder: Path, start: int) -> int:
    """Delete the checkpoint files of blocks ``start``, ``start`` + 1, ...; returns how many blocks they were."""
    n = 0
    for f in sorted(folder.glob("block_*.*")) + sorted(folder.glob(".block_*.tmp*")):
        index = f.name.lstrip(".").split("_")[1].split(".")[0]
        if index.isdigit() and int(index) >= start:
            f.unlink(missing_ok=True)
            n += f.suffix == ".json"
    return n
