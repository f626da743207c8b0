"""Where a decoder block's weights come from when a block walk reaches it: memory, or the model's shards on disk.

Two block sources with one interface, ``open(i, device) -> block`` and ``close(i, block)``, called in block
order by :func:`magr.pipeline.calibration.walk_blocks` (quantization, statistics) and by the streamed perplexity:

- :class:`ResidentBlocks`: the whole model is in memory (``from_pretrained``); a block is moved to the compute
  device for its turn and back afterwards.
- :class:`StreamedModel`: only the model's skeleton is in memory, its parameters on the meta device, with the
  tensors every step needs resident (embeddings, final norm, lm_head, and the rotary tables, which are computed,
  not read); block i's tensors are read from the safetensors files when the walk opens it (only those tensors)
  and dropped when it closes it. While block i computes, a thread reads block i + 1's tensors (prefetch), so at
  most two blocks' tensors are in memory. Tied embeddings stay tied.

A model is streamed when its source is a folder of safetensors files (``load="auto"``, the default, or
``"stream"``); anything else (a .gguf, a hub id) is loaded whole (``"full"``): convert it once into a folder
(scripts/prepare_model.py, the pipeline's ``prepare`` stage).
"""
from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .models import (
    checked_layers,
    decoder_layers,
    load_config,
    load_model,
    model_source,
)
from .checkpoints import shard_path
from .memory import STEADY_FROM_BLOCK_BYTES, steady_allocator
from .persistence import PARAMS_FILE, grid_tensors, save_tokenizer, staged_folder
from .shards import (
    INDEX_FILE,
    TensorFiles,
    folder_files,
    shard_name,
    write_index,
    write_safetensors,
    write_sharded,
)

log = logging.getLogger(__name__)

LOAD_MODES = ("auto", "stream", "full")
LAYERS_PREFIX = "model.layers."


# --------------------------------------------------------------------------------------- which path
def will_stream(name_or_path, load: str = "auto") -> bool:
    """Whether ``load`` (auto, stream, full) streams this model: auto streams a folder of safetensors files;
    ``stream`` for any other source is a ValueError saying how to convert it."""
    if load not in LOAD_MODES:
        raise ValueError(f"load={load!r} not understood; allowed: {', '.join(LOAD_MODES)}")
    if load == "full":
        return False
    kind, where = model_source(name_or_path)
    can = kind == "folder" and bool(folder_files(where))
    if load == "stream" and not can:
        raise ValueError(f"model {str(name_or_path)!r} ({kind}) cannot be streamed: streaming reads a folder of "
                         "safetensors files; convert it once (python scripts/prepare_model.py --source "
                         f"{name_or_path} --out FOLDER) and pass the folder, or use --load full")
    return can


def open_model(name_or_path, dtype: torch.dtype = torch.float32, tokenizer=None, load: str = "auto"):
    """``(model, tokenizer, blocks)``: with streaming (:func:`will_stream`) the skeleton of a
    :class:`StreamedModel` and that source; else the whole model and its :class:`ResidentBlocks`."""
    if will_stream(name_or_path, load):
        if tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(name_or_path)
        source = StreamedModel.from_folder(model_source(name_or_path)[1], dtype)
        return source.model, tokenizer, source
    model, tokenizer = load_model(name_or_path, dtype=dtype, tokenizer=tokenizer)
    return model, tokenizer, ResidentBlocks(model)


# ------------------------------------------------------------------------------------------- sources
class ResidentBlocks:
    """The blocks of a model in memory: each is moved to the compute device when opened and back when closed."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model
        self._homes: dict[int, torch.device] = {}

    def __len__(self) -> int:
        return len(checked_layers(self.model))

    def open(self, i: int, device) -> nn.Module:
        block = decoder_layers(self.model)[i]
        self._homes[i] = next(block.parameters()).device
        return block.to(device)

    def close(self, i: int, block: nn.Module) -> None:
        block.to(self._homes.pop(i))


@contextmanager
def parameters_on_meta():
    """Modules built inside the ``with`` block get their parameters on the meta device (no memory, and their
    initialisation costs nothing); buffers, such as the rotary tables, are computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(folder, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder`` built from its config, parameters on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = load_config(str(folder))
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


class StreamedModel:
    """A model whose decoder blocks stay on disk until the walk opens them (module docstring)."""

    streamed = True

    def __init__(self, model: nn.Module, files: TensorFiles, block_files: TensorFiles | None = None,
                 dtype: torch.dtype | None = None, prefetch: bool = True):
        self.model, self.files, self.dtype = model, files, dtype
        self.block_files = block_files or files
        self.prefetch = prefetch
        self._pending: tuple[int, object] | None = None
        self._reader: ThreadPoolExecutor | None = None

    @classmethod
    def from_folder(cls, folder, dtype: torch.dtype = torch.float32, prefetch: bool = True) -> StreamedModel:
        """The skeleton of ``folder`` with its resident tensors read (every tensor outside the decoder blocks)."""
        model = skeleton(folder, dtype)
        files = TensorFiles.of_folder(folder)
        source = cls(model, files, dtype=dtype, prefetch=prefetch)
        source._load_resident()
        block_bytes = max(files.nbytes(source.block_names(i)) for i in range(len(source)))
        if block_bytes >= STEADY_FROM_BLOCK_BYTES:  # a model where memory is the point: a peak that does not creep
            steady_allocator()
        log.info("streaming %s: %d blocks read one at a time; resident %.3f GB (embeddings, norm, lm_head)",
                 folder, len(source), source.resident_bytes() / 1e9)
        return source

    def with_checkpoints(self, folder) -> StreamedModel:
        """The same model with its blocks read from the block checkpoints in ``folder`` (the quantized blocks'
        shards, :func:`magr.pipeline.checkpoints.shard_path`)."""
        block_files = TensorFiles([shard_path(folder, i) for i in range(len(self))])
        return StreamedModel(self.model, self.files, block_files, self.dtype, self.prefetch)

    def __len__(self) -> int:
        return len(checked_layers(self.model))

    # -- names
    def block_names(self, i: int) -> list[str]:
        """Block ``i``'s tensor names in the model's state dict (``model.layers.i.*``)."""
        return [f"{LAYERS_PREFIX}{i}.{k}" for k in decoder_layers(self.model)[i].state_dict()]

    def resident_names(self) -> list[str]:
        """Every tensor of the files outside the decoder blocks."""
        return [n for n in self.files.names() if not n.startswith(LAYERS_PREFIX)]

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in _unique(self.resident_state().values()))

    def resident_state(self) -> dict[str, torch.Tensor]:
        """The skeleton's tensors outside the blocks as save_pretrained writes them (a tied lm_head left out)."""
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(LAYERS_PREFIX)}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    # -- reading
    def read_block(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (local names, as the block's state dict), cast to the model's dtype."""
        prefix = f"{LAYERS_PREFIX}{i}."
        tensors = self.block_files.read(self.block_names(i), dtype=self.dtype)
        return {k.removeprefix(prefix): v for k, v in tensors.items()}

    def _take(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors, from the prefetch when it read them; then start reading block i + 1."""
        pending, self._pending = self._pending, None
        tensors = pending[1].result() if pending is not None and pending[0] == i else self.read_block(i)
        if self.prefetch and i + 1 < len(self):
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="magr-prefetch")
            self._pending = (i + 1, self._reader.submit(self.read_block, i + 1))
        elif self._reader is not None:  # the last block: the reader thread has nothing left to do
            self._reader.shutdown(wait=False)
            self._reader = None
        return tensors

    def open(self, i: int, device) -> nn.Module:
        """Block ``i`` with its tensors read from disk, on ``device``."""
        block = decoder_layers(self.model)[i]
        block.load_state_dict(self._take(i), assign=True)
        return block.to(device)

    def close(self, i: int, block: nn.Module) -> None:
        """Drop block ``i``'s tensors (its parameters go back to the meta device)."""
        block.to("meta")

    def _load_resident(self) -> None:
        names = self.resident_names()
        missing, unexpected = self.model.load_state_dict(self.files.read(names, dtype=self.dtype), strict=False,
                                                         assign=True)
        if unexpected:
            raise ValueError(f"the model's weight files hold {len(unexpected)} tensor(s) its config does not "
                             f"build, e.g. {unexpected[0]}; re-save the model")
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        absent = [k for k in missing if not k.startswith(LAYERS_PREFIX) and not (tied and k == "lm_head.weight")]
        if absent:
            raise ValueError(f"the model's weight files lack {len(absent)} tensor(s), e.g. {absent[0]}; "
                             "re-download or re-save the model")
        if tied:
            self.model.tie_weights()

    @contextmanager
    def resident_on(self, device):
        """The resident modules (embeddings, norm, lm_head, rotary tables) on ``device`` for the ``with`` block."""
        device = torch.device(device)
        if device.type == "cpu":
            yield
            return
        inner = self.model.model
        layers, inner.layers = inner.layers, nn.ModuleList()
        try:
            self.model.to(device)
            yield
        finally:
            self.model.to("cpu")
            inner.layers = layers


def _unique(tensors):
    seen = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


# ------------------------------------------------------------------------------------------- writing
def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy on disk); a copy where links cannot be made (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_streamed(source: StreamedModel, tokenizer, params, out, block_files: list[Path]) -> Path:
    """Save a streamed, quantized model as a sharded ``save_pretrained`` folder plus its grids: block i's shard
    is its checkpoint file (``block_files[i]``, linked), the resident tensors are the last shard, and
    ``model.safetensors.index.json`` is moved into place last, after every shard."""
    out = Path(out)
    n = len(block_files) + 1
    with staged_folder(out, last=(INDEX_FILE,)) as stage:
        source.model.config.save_pretrained(stage)
        if getattr(source.model, "generation_config", None) is not None:
            source.model.generation_config.save_pretrained(stage)
        save_tokenizer(tokenizer, stage)
        write_safetensors(stage / PARAMS_FILE, grid_tensors(params))
        weight_map, total = {}, 0
        for i, path in enumerate(block_files):
            _link_or_copy(Path(path), stage / shard_name(i, n))
            files = TensorFiles([path])
            weight_map.update(dict.fromkeys(files.names(), shard_name(i, n)))
            total += files.nbytes()
        resident = source.resident_state()
        write_safetensors(stage / shard_name(n - 1, n), {k: v.contiguous() for k, v in resident.items()})
        weight_map.update(dict.fromkeys(resident, shard_name(n - 1, n)))
        total += sum(v.numel() * v.element_size() for v in resident.values())
        write_index(stage, weight_map, total)
    log.info("saved the quantized model to %s (%d shards, one per block)", out, n)
    return out


def convert_folder(source, out, dtype: torch.dtype, tokenizer=None) -> Path:
    """Copy a safetensors model folder into ``out`` in ``dtype`` one block at a time (what the pipeline's
    ``prepare`` stage does for a folder, so that a model larger than memory is never loaded whole): block i's
    tensors become shard i, the others the last shard, the index is written last; config, generation config and
    tokenizer go along."""
    from transformers import AutoConfig

    source, out = Path(source), Path(out)
    files = TensorFiles.of_folder(source)
    names = files.names()
    n_blocks = 1 + max((int(k[len(LAYERS_PREFIX):].split(".")[0]) for k in names if k.startswith(LAYERS_PREFIX)),
                       default=-1)
    groups = [[k for k in names if k.startswith(f"{LAYERS_PREFIX}{i}.")] for i in range(n_blocks)]
    groups.append([k for k in names if not k.startswith(LAYERS_PREFIX)])
    n = len(groups)
    with staged_folder(out, last=(INDEX_FILE,)) as stage:
        config = AutoConfig.from_pretrained(str(source))
        config.dtype = dtype
        config.save_pretrained(stage)
        if (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", stage / "generation_config.json")
        if tokenizer is not None:
            save_tokenizer(tokenizer, stage)
        write_sharded(stage, (files.read(g, dtype=dtype) for g in tqdm(groups, desc="convert", unit="shard")), n)
    log.info("converted %s to %s (%s, %d shards, one per block)", source, out, dtype, n)
    return out
