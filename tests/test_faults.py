"""Fault injection: a run that is killed, interrupted, or fails mid-write, or that finds the wrong checkpoints
or a bad model, ends either with a clear error before any work or with exactly the weights of an
uninterrupted run (bit for bit), never with a mix.

Each test names the protection it exercises; README "Resume, checkpoints and errors" lists them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magr.cli import main
from magr.pipeline.models import load_model
from magr.pipeline.shards import TensorFiles

HERE = Path(__file__).resolve().parent
N_BLOCKS = 5  # stories260K
ARGS = ["--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10", "--bits", "3"]


def quantize(out, *extra, model="stories260k") -> int:
    return main(["quantize", "--model", str(model), "--out", str(out), *ARGS, *extra])


def run_with_fault(fault: str, block: int, out, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["quantize", "--model", "stories260k", "--out", str(out), *ARGS, *extra]
    return subprocess.run([sys.executable, str(HERE / "fault_runner.py"), fault, str(block), "--", *argv],
                          env=env, capture_output=True, text=True, timeout=600)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a saved model folder (one model.safetensors, or shards with an index)."""
    files = TensorFiles.of_folder(folder)
    return files.read(files.names())


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and grids."""
    for name, read in (("weights", folder_tensors), ("grids", lambda f: load_file(str(f / "magr_qparams.safetensors")))):
        ta, tb = read(a), read(b)
        assert ta.keys() == tb.keys()
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def clear_stale_lock(out: Path, capsys) -> None:
    """A SIGKILL leaves the run's lock: the rerun refuses, naming it and how to remove it; the user removes it."""
    lock = out / ".magr.lock"
    assert lock.is_file()
    capsys.readouterr()
    assert quantize(out) == 2
    assert f"stale lock {lock} of a run that no longer runs" in capsys.readouterr().err
    lock.unlink()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared):
    """Uninterrupted runs, one per method, keyed by method."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for method in ("rtn", "optq", "magr+optq", "magr+optq-cd"):
        out[method] = root / method
        assert quantize(out[method], "--method", method, "--cd-passes", "2") == 0
    return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, shared):
    """stories260K saved as a plain model folder (with its tokenizer)."""
    import shutil

    from magr.pipeline.sources import stories260k_path

    folder = tmp_path_factory.mktemp("models") / "s260k"
    shutil.copytree(stories260k_path(), folder)
    return folder


# ------------------------------------------------------------------------------- kills and resumes
@pytest.mark.parametrize("method", ["rtn", "optq", "magr+optq", "magr+optq-cd"])
def test_sigkill_at_a_random_block_then_resume_is_bit_identical(method, reference, tmp_path, capsys):
    """Protection: block checkpoints with a resume key (a rerun continues where the kill stopped)."""
    block = random.randrange(N_BLOCKS - 1)
    out = tmp_path / "run"
    killed = run_with_fault("kill-after", block, out, "--method", method, "--cd-passes", "2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / ".blocks").glob("*.json")) == [f"block_{i:03d}.json" for i in range(block + 1)]
    clear_stale_lock(out, capsys)
    assert quantize(out, "--method", method, "--cd-passes", "2") == 0
    run = json.loads((out / "magr_run.json").read_text())
    assert run["resumed_blocks"] == list(range(block + 1)), f"killed after block {block}"
    assert_same_run(out, reference[method])
    assert not (out / ".blocks").exists()  # removed after success


def test_kill_in_the_middle_of_a_checkpoint_write_then_resume(reference, tmp_path, capsys):
    """Protection: atomic writes (temporary name, fsync, rename): a half-written file never has a final name."""
    block = random.randrange(1, N_BLOCKS)
    out = tmp_path / "run"
    killed = run_with_fault("kill-mid-write", block, out, "--method", "magr+optq", "--cd-passes", "2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = sorted(p.name for p in (out / ".blocks").iterdir() if not p.name.startswith("."))
    assert names == [f"block_{i:03d}.{s}" for i in range(block) for s in ("json", "pt", "safetensors")], (
        f"killed in block {block}")
    clear_stale_lock(out, capsys)
    assert quantize(out, "--method", "magr+optq", "--cd-passes", "2") == 0
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == list(range(block))
    assert_same_run(out, reference["magr+optq"])


def test_disk_full_in_the_middle_of_a_write_then_resume(reference, tmp_path):
    """Protection: atomic writes and a clear OS error; the rerun resumes the complete blocks."""
    block = random.randrange(1, N_BLOCKS)
    out = tmp_path / "run"
    failed = run_with_fault("enospc", block, out, "--method", "optq")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        f"magr quantize: error: [Errno 28] No space left on device: '{out / '.blocks' / f'block_{block:03d}.json'}'")
    leftovers = [p.name for p in (out / ".blocks").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"
    for js in (out / ".blocks").glob("*.json"):
        json.loads(js.read_text())  # every file under a final name is complete
    assert not (out / ".blocks" / f"block_{block:03d}.json").exists()
    assert quantize(out, "--method", "optq") == 0
    assert_same_run(out, reference["optq"])


@pytest.mark.parametrize("damage", ["empty json", "truncated pt"])
def test_damaged_checkpoint_is_named_discarded_and_recomputed(damage, reference, tmp_path, caplog):
    """Protection: checkpoint validation (JSON parses, recorded SHA-256 of the .pt, tensors fit the block)."""
    out = tmp_path / "run"
    assert quantize(out, "--method", "magr+optq", "--cd-passes", "2", "--keep-checkpoints") == 0
    (out / "magr_run.json").unlink()
    victim = out / ".blocks" / ("block_002.json" if damage == "empty json" else "block_002.pt")
    victim.write_bytes(b"" if damage == "empty json" else victim.read_bytes()[:1000])
    assert quantize(out, "--method", "magr+optq", "--cd-passes", "2") == 0
    assert f"damaged checkpoint {victim}" in caplog.text
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == [0, 1]
    assert_same_run(out, reference["magr+optq"])


def test_ctrl_c_is_one_line_and_the_rerun_resumes(reference, tmp_path, capsys, monkeypatch):
    """Protection: Interrupted's message (what is saved, how to resume) instead of a traceback."""
    import magr.pipeline.blocks as pipeline

    calls = []
    real = pipeline.quantize_block

    def interrupt_in_block_2(block, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(block, *args)

    monkeypatch.setattr(pipeline, "quantize_block", interrupt_in_block_2)
    out = tmp_path / "run"
    assert quantize(out, "--method", "rtn", "--cd-passes", "2") == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"magr quantize: interrupted in block 2 of 5: blocks 0-1 are saved in {out / '.blocks'}; "
                   "rerun the same command to resume from block 2")
    monkeypatch.setattr(pipeline, "quantize_block", real)
    assert quantize(out, "--method", "rtn", "--cd-passes", "2") == 0
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == [0, 1]
    assert_same_run(out, reference["rtn"])


# ------------------------------------------------------------------------------- foreign checkpoints
def _checkpoints_of(model, out, dtype=torch.float32):
    from magr.pipeline.calibration_data import Calibration
    from magr.core.methods import QuantConfig
    from magr.pipeline.blocks import quantize_model

    net, tok = load_model(str(model), dtype=dtype)
    calib = Calibration("tinystories", 4, 64).tokens(tok)
    quantize_model(net, calib, QuantConfig.build(method="rtn", bits=3), device="cpu", progress=False,
                   checkpoint_dir=out / ".blocks")


def test_checkpoints_of_another_model_are_not_resumed(model_folder, reference, tmp_path, caplog):
    """Protection: the model fingerprint (config, embeddings, block weights) in the resume key."""
    other = tmp_path / "other"
    net, _ = load_model(str(model_folder))
    with torch.no_grad():
        net.model.layers[3].mlp.up_proj.weight.mul_(1.01)  # differs from stories260K in block 3 only
    net.save_pretrained(other)
    (other / "tokenizer.model").write_bytes((model_folder / "tokenizer.model").read_bytes())
    out = tmp_path / "run"
    _checkpoints_of(other, out)
    assert quantize(out, "--method", "rtn", model=model_folder) == 0
    assert f"{out / '.blocks' / 'block_003.json'} was made with another model" in caplog.text
    # blocks 0-2 have the same weights in both models: their checkpoints are the same result
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == [0, 1, 2]
    assert_same_run(out, reference["rtn"])
    # --resume force takes them anyway, --resume never ignores them
    _checkpoints_of(other, out)
    assert quantize(out, "--method", "rtn", "--resume", "force", model=model_folder) == 0
    assert "resumed anyway (--resume force)" in caplog.text
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == [0, 1, 2, 3, 4]
    _checkpoints_of(other, out)
    assert quantize(out, "--method", "rtn", "--resume", "never", model=model_folder) == 0
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == []
    assert_same_run(out, reference["rtn"])


def test_checkpoints_of_another_dtype_are_not_resumed(tmp_path, caplog):
    """Protection: the dtype in the resume key."""
    fresh, out = tmp_path / "fresh", tmp_path / "run"
    assert quantize(fresh, "--method", "rtn", "--dtype", "bfloat16") == 0
    _checkpoints_of("stories260k", out, dtype=torch.float32)
    assert quantize(out, "--method", "rtn", "--dtype", "bfloat16") == 0
    assert "was made with another dtype (float32 -> bfloat16)" in caplog.text
    assert json.loads((out / "magr_run.json").read_text())["resumed_blocks"] == []
    assert_same_run(out, fresh)


# ------------------------------------------------------------------------------- bad models, bad --out
@pytest.mark.parametrize("value, where", [(float("nan"), "model.layers.2.mlp.down_proj.weight"),
                                          (float("inf"), "model.layers.0.self_attn.q_proj.weight")])
def test_non_finite_weight_is_named_before_any_block(value, where, model_folder, tmp_path, capsys, monkeypatch):
    """Protection: preflight.check_finite."""
    import magr.pipeline.blocks as pipeline

    bad = tmp_path / "bad"
    net, _ = load_model(str(model_folder))
    with torch.no_grad():
        net.get_submodule(where.removesuffix(".weight")).weight[5, 7] = value
    net.save_pretrained(bad)
    (bad / "tokenizer.model").write_bytes((model_folder / "tokenizer.model").read_bytes())
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a: pytest.fail("a block was quantized"))
    out = tmp_path / "run"
    assert quantize(out, "--method", "optq", model=bad) == 2
    assert f"model weight {where} has a non-finite value ({value}) at index [5, 7]" in capsys.readouterr().err
    assert not (out / ".blocks").exists()


def test_out_equal_to_the_input_model_folder_is_refused(model_folder, capsys):
    """Protection: preflight.check_output."""
    before = sha(model_folder / "model.safetensors")
    assert quantize(model_folder, "--method", "rtn", model=model_folder) == 2
    assert "is the input model's folder" in capsys.readouterr().err
    assert sha(model_folder / "model.safetensors") == before
    assert not (model_folder / ".blocks").exists()
