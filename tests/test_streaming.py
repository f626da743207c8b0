"""Streaming (magr.pipeline.streaming): a model folder quantized and evaluated one decoder block at a time from
disk to disk gives the in-memory run's weights, grids, perplexities and exports bit for bit; a block's tensors
are read only when the walk reaches it (or, prefetched, while the block before it computes) and dropped after;
an interrupted streamed run resumes to the same weights."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_faults import (
    assert_same_run,
    clear_stale_lock,
    folder_tensors,
    run_with_fault,
)

from magr.cli import main
from magr.core.methods import QuantConfig
from magr.pipeline.blocks import quantize_model
from magr.pipeline.calibration_data import Calibration
from magr.pipeline.models import load_model
from magr.pipeline.sources import stories260k_path
from magr.pipeline.streaming import StreamedModel, open_model

ARGS = ["--model", "stories260k", "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10",
        "--cd-passes", "2", "--eval-sets", "tinystories", "--eval-seqlen", "64", "--max-windows", "3",
        "--eval-batch", "2", "--forward-dtype", "bfloat16"]


def quantize(out, *extra) -> int:
    return main(["quantize", *ARGS, "--out", str(out), *extra])


def ppl(out: Path) -> dict:
    return {k: v["ppl"] for k, v in json.loads((out / "magr_run.json").read_text())["ppl"].items()}


@pytest.mark.parametrize("group", [[], ["--group-size", "4"]], ids=["per-channel", "g4"])
@pytest.mark.parametrize("method", ["rtn", "optq", "magr+optq", "magr+optq-cd"])
def test_streamed_run_equals_the_in_memory_run(method, group, tmp_path, shared):
    full, streamed = tmp_path / "full", tmp_path / "streamed"
    assert quantize(full, "--method", method, "--bits", "3", *group, "--load", "full") == 0
    assert quantize(streamed, "--method", method, "--bits", "3", *group, "--load", "stream") == 0
    assert json.loads((streamed / "magr_run.json").read_text())["load"] == "stream"
    assert (streamed / "model.safetensors.index.json").is_file() and not (full / "model.safetensors.index.json").exists()
    assert_same_run(streamed, full)
    assert ppl(streamed) == ppl(full)  # equal floats, not close ones


def test_blocks_are_read_only_when_the_walk_reaches_them(shared, tmp_path, monkeypatch):
    """Block i's tensors are read once, while block i - 1 computes at the earliest (the prefetch), and only
    the open block holds real tensors; nothing of a block is read before."""
    source = StreamedModel.from_folder(stories260k_path())
    n = len(source)
    events, reads = [], {}
    real_read, real_open = StreamedModel.read_block, StreamedModel.open

    def read_block(self, i):
        events.append(("read", i))
        tensors = real_read(self, i)
        reads[i] = reads.get(i, 0) + len(tensors)
        return tensors

    def open_block(self, i, device):
        loaded = [k for k, layer in enumerate(self.model.model.layers) if next(layer.parameters()).device.type != "meta"]
        assert loaded == [], f"opening block {i} while blocks {loaded} still hold tensors"
        events.append(("open", i))
        return real_open(self, i, device)

    monkeypatch.setattr(StreamedModel, "read_block", read_block)
    monkeypatch.setattr(StreamedModel, "open", open_block)
    assert events == [] and all(p.device.type == "meta" for p in source.model.model.layers.parameters())
    calib = Calibration("tinystories", 4, 64).tokens(load_model("stories260k")[1])
    quantize_model(source.model, calib, QuantConfig.build(method="magr+optq", bits=3, iters=5), device="cpu",
                   progress=False, checkpoint_dir=tmp_path, blocks=source)
    per_block = len(source.model.model.layers[0].state_dict())
    assert reads == {i: per_block for i in range(n)}  # each block read once, every tensor of it
    for i in range(1, n):
        assert events.index(("read", i)) > events.index(("open", i - 1)), events
    assert [e for e in events if e[0] == "open"] == [("open", i) for i in range(n)]


def test_interrupted_streamed_run_resumes_bit_identical(tmp_path, capsys, shared):
    reference, out = tmp_path / "reference", tmp_path / "run"
    common = ["--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10", "--bits", "3",
              "--method", "magr+optq", "--cd-passes", "2"]
    assert main(["quantize", "--model", "stories260k", "--out", str(reference), *common, "--load", "full"]) == 0
    killed = run_with_fault("kill-after", 2, out, "--load", "stream", "--method", "magr+optq", "--cd-passes", "2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not list(out.glob("model*.safetensors*")), "a killed run left a (half) model"
    clear_stale_lock(out, capsys)
    assert main(["quantize", "--model", "stories260k", "--out", str(out), *common, "--load", "stream"]) == 0
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == [0, 1, 2]
    assert_same_run(out, reference)
    assert not (out / ".blocks").exists()


def test_streamed_folder_loads_with_transformers_and_exports_like_the_in_memory_one(tmp_path, shared):
    full, streamed = tmp_path / "full", tmp_path / "streamed"
    settings = ["--method", "optq", "--bits", "4", "--save-format", "gptq"]
    assert quantize(full, *settings, "--load", "full") == 0
    assert quantize(streamed, *settings, "--load", "stream") == 0
    assert folder_tensors(streamed / "gptq").keys() == folder_tensors(full / "gptq").keys()
    assert all(torch.equal(a, folder_tensors(full / "gptq")[k]) for k, a in folder_tensors(streamed / "gptq").items())
    # `magr export` of the streamed run folder, block by block, and of the in-memory one, whole
    for fmt in ("gptq", "compressed-tensors"):
        assert main(["export", str(streamed), "--format", fmt, "--out", str(tmp_path / f"s-{fmt}")]) == 0
        assert main(["export", str(full), "--format", fmt, "--out", str(tmp_path / f"f-{fmt}"), "--load", "full"]) == 0
        a, b = folder_tensors(tmp_path / f"s-{fmt}"), folder_tensors(tmp_path / f"f-{fmt}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fmt
    tokens = torch.randint(3, 500, (1, 32))
    with torch.no_grad():
        logits = [load_model(str(f))[0](tokens).logits for f in (full, streamed)]
    assert torch.equal(*logits)


def test_skeleton_matches_the_loaded_model_and_stays_tied(shared):
    model, _ = load_model("stories260k")
    skeleton, _, source = open_model("stories260k")
    assert source.streamed and skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert all(torch.equal(a, b) for a, b in zip(skeleton.buffers(), model.buffers()))  # the rotary tables
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())
    assert not open_model("stories260k", load="full")[2].streamed


def test_a_source_that_cannot_stream_is_refused_under_load_stream(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["quantize", "--model", str(gguf), "--out", str(tmp_path / "o"), "--load", "stream"]) == 2
    err = capsys.readouterr().err
    assert "cannot be streamed: streaming reads a folder of safetensors files; convert it once" in err
    assert "--load full" in err and not (tmp_path / "o").exists()


def test_prepare_copies_a_folder_block_by_block_in_the_requested_dtype(tmp_path, shared):
    from magr.pipeline.streaming import convert_folder
    from magr.pipeline.tokenizer import load_tokenizer

    convert_folder(stories260k_path(), tmp_path / "bf16", torch.bfloat16, load_tokenizer("stories260k"))
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    a, b = load_model(str(tmp_path / "bf16"), dtype=torch.bfloat16)[0], load_model("stories260k", dtype=torch.bfloat16)[0]
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_readme_memory_table_is_the_computed_one():
    from magr.pipeline.memory import LLAMA2, memory_table

    assert memory_table() in (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [round(s.params / 1e9, 2) for s in LLAMA2.values()] == [6.74, 13.02, 68.98]  # the published sizes


STEADY_CHECK = """
import gc, sys, psutil, torch
from magr.pipeline.memory import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator()
rss = lambda: psutil.Process().memory_info().rss
warm = torch.ones(8_000_000)  # 32 MB, mmapped; freeing it raises glibc's default mmap threshold to 32 MB
del warm
kept, peaks = [], []
for step in range(12):  # block-sized buffers, a little larger each round, each followed by a small kept one
    big = []
    for _ in range(8):
        big.append(torch.ones(1_000_000 + 20_000 * step))
        kept.append(torch.ones(1000))
    del big
    gc.collect()
    peaks.append(rss())
print((peaks[-1] - peaks[0]) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt: glibc only")
def test_steady_allocator_gives_block_sized_buffers_back():
    """Block-sized buffers freed between small kept ones: glibc's default (its mmap threshold raised by a freed
    32 MB buffer) serves them from the heap and keeps the holes, RSS grows round after round (the streamed run's
    creeping peak); after steady_allocator they are mmapped and given back."""
    import subprocess

    def growth(mode):  # one thread: the default keeps tens of MiB of this pattern here (hundreds with two)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", STEADY_CHECK, mode], capture_output=True, text=True, check=True,
                             env=env)
        return float(out.stdout.strip().splitlines()[-1])

    default = growth("default")
    if default < 16:
        pytest.skip(f"this malloc kept only {default:.1f} MiB with its defaults: the pattern shows no creep here")
    steady = growth("steady")
    assert steady < 8, f"RSS grew {steady:.1f} MiB over 12 rounds with the steady allocator ({default:.1f} without)"


def test_peak_rss_summary_windows(tmp_path, monkeypatch):
    """benchmarks/peak_rss.py --summarize: highest and lowest RSS per window of a logged timeline, from --skip on;
    a window without samples is left out."""
    import json

    from conftest import load_benchmark

    peak_rss = load_benchmark("peak_rss", monkeypatch)
    log = tmp_path / "run.rss.jsonl"
    log.write_text("".join(json.dumps({"t": t, "rss_gib": r}) + "\n"
                           for t, r in [(0, 9.0), (5, 1.0), (10, 2.0), (14, 3.0), (19, 2.5), (41, 4.0)]))
    assert peak_rss.windows(log, 10, skip=5) == [{"from_s": 5, "max_gib": 3.0, "min_gib": 1.0},
                                                 {"from_s": 15, "max_gib": 2.5, "min_gib": 2.5},
                                                 {"from_s": 35, "max_gib": 4.0, "min_gib": 4.0}]
