"""Issue 23's loose ends, each a clear one-line error before any work (or no noise at all): damaged weight
files, two runs into one folder (the run lock), text files that are not UTF-8, run folders of an older magr,
and third-party import warnings in the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from magr.cli import main
from magr.pipeline.persistence import LOCK_FILE
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--method", "rtn", "--bits", "4", "--calib", "tinystories", "--nsamples", "2", "--seqlen", "64",
        "--device", "cpu"]


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the weights are loaded or a block is quantized."""
    import magr.pipeline.blocks as blocks
    import magr.runs as runs

    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(blocks, "quantize_block", lambda *a: pytest.fail("a block was quantized"))


@pytest.fixture
def model_copy(tmp_path, shared):
    from magr.pipeline.sources import stories260k_path

    folder = tmp_path / "s260k"
    shutil.copytree(stories260k_path(), folder)
    return folder


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# ------------------------------------------------------------------------------------ damaged weights
def test_truncated_model_safetensors_is_one_line_before_any_work(model_copy, tmp_path, no_long_work, capsys):
    path = model_copy / "model.safetensors"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    assert main(["quantize", "--model", str(model_copy), *ARGS, "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == (f"magr quantize: error: model weight file {path} is damaged: truncated: {size // 2} "
                              f"bytes, its 47 tensors need {size} ({size - size // 2} bytes missing); re-download "
                              "or re-save the model")
    assert not (tmp_path / "out").exists()
    os.truncate(path, 5)
    assert main(["ppl", "--model", str(model_copy), "--eval-sets", "tinystories", "--device", "cpu"]) == 2
    assert f"{path} is damaged: only 5 bytes: too short" in _error(capsys)


def test_damaged_or_missing_shard_of_a_sharded_model_is_named(model_copy, tmp_path, stories260k, capsys):
    model, _ = stories260k
    sharded = tmp_path / "sharded"
    shutil.copytree(model_copy, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(sharded, max_shard_size="300KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    with open(shards[1], "r+b") as f:  # a damaged header: its JSON overwritten
        f.seek(10)
        f.write(b"\xff\xfe garbage")
    assert main(["ppl", "--model", str(sharded), "--eval-sets", "tinystories", "--device", "cpu"]) == 2
    assert _error(capsys) == (f"magr ppl: error: model weight file {shards[1]} is damaged: its header is not valid "
                              "JSON (not a safetensors file, or damaged); re-download or re-save the model")
    shards[1].unlink()
    assert main(["ppl", "--model", str(sharded), "--eval-sets", "tinystories", "--device", "cpu"]) == 2
    assert f"model weight shard {shards[1]} named in" in _error(capsys)


# --------------------------------------------------------------------------------------------- lock
def _holder(out: Path):
    """Another process that holds the lock of ``out`` until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from magr.pipeline.persistence import run_lock
        with run_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_locked_folder_refuses_naming_the_holder(tmp_path, no_long_work, capsys, shared):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        assert main(["quantize", "--model", "stories260k", *ARGS, "--out", str(out)]) == 2
        err = _error(capsys)
        assert f"{out} is being written by another magr run (pid {holder.pid} on " in err
        assert "wait for it to finish or give another --out" in err
    finally:
        holder.kill()
        holder.wait()
    # killed while holding it: a stale lock, reported with how to remove it, never taken over
    assert main(["quantize", "--model", "stories260k", *ARGS, "--out", str(out)]) == 2
    err = _error(capsys)
    assert f"stale lock {out / LOCK_FILE} of a run that no longer runs (pid {holder.pid}" in err
    assert f"rm {out / LOCK_FILE}" in err
    assert (out / LOCK_FILE).exists()
    # and an export of the folder is refused as well
    assert main(["export", str(out), "--out", str(tmp_path / "e")]) == 2
    assert "stale lock" in _error(capsys)


def test_lock_is_released_on_success_errors_and_ctrl_c(tmp_path, monkeypatch, capsys, shared):
    import magr.runs as runs
    from magr.pipeline.persistence import run_lock

    out = tmp_path / "out"
    assert main(["quantize", "--model", "stories260k", *ARGS, "--out", str(out)]) == 0
    assert not (out / LOCK_FILE).exists() and (out / "magr_run.json").is_file()
    # an error after the lock (group size against the widths, from the config): released, no folder left
    assert main(["quantize", "--model", "stories260k", *ARGS, "--group-size", "64", "--out", str(tmp_path / "g")]) == 2
    assert "does not divide" in _error(capsys)
    assert not (tmp_path / "g").exists()

    def interrupt(*a, **k):
        assert (out / LOCK_FILE).is_file()  # held while the run works
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "quantize_model", interrupt)
    assert main(["quantize", "--model", "stories260k", *ARGS, "--out", str(out)]) == 130
    assert not (out / LOCK_FILE).exists()
    with run_lock(out):  # free again
        pass


# ------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_text_file_that_is_not_utf8_is_named_with_its_offset(suffix, tmp_path, no_long_work, capsys, shared):
    bad = tmp_path / f"latin1{suffix}"
    text = "Once upon a time.\nCaf\xe9 au lait.\n"
    if suffix == ".jsonl":
        text = json.dumps({"text": "Once upon a time."}) + "\n" + '{"text": "Caf\xe9"}\n'
    bad.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe9")
    expected = (f"{bad} is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 2) cannot be decoded; accepted "
                "encoding: UTF-8")
    assert main(["quantize", "--model", "stories260k", *ARGS[:4], "--calib", str(bad), "--nsamples", "1",
                 "--seqlen", "4", "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert expected in _error(capsys)
    assert main(["ppl", "--model", "stories260k", "--eval-sets", str(bad), "--eval-seqlen", "4", "--device", "cpu"]) == 2
    assert expected in _error(capsys)


# -------------------------------------------------------------------------------------- older run format
def test_export_of_an_older_run_folder_says_so_without_overwriting_it(tmp_path, capsys):
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "magr_quantization.json").write_text(json.dumps({"format": "magr-dequantized-v1",
                                                            "source_model": "stories260k"}))
    for name in ("magr_qparams.safetensors", "model.safetensors", "magr_layers.json"):
        (old / name).write_bytes(b"")
    before = sorted(p.name for p in old.iterdir())
    assert main(["export", str(old), "--out", str(tmp_path / "e")]) == 2
    err = _error(capsys)
    assert f"{old} is a run folder of an older magr (magr_quantization.json, no magr_run.json)" in err
    assert "`magr quantize --model stories260k ... --out NEW_FOLDER`" in err
    assert f"--out {old}" not in err
    assert sorted(p.name for p in old.iterdir()) == before and not (tmp_path / "e").exists()
    (old / "magr_quantization.json").unlink()  # model and grids without metadata: an unfinished run
    assert main(["export", str(old), "--out", str(tmp_path / "e")]) == 2
    assert "holds an unfinished run" in _error(capsys)


# ----------------------------------------------------------------------------------------- quiet imports
EXPORT_STACK = ("torchao", "gptqmodel", "optimum", "compressed_tensors")


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_help_imports_no_export_stack():
    done = _run_python("import sys\nfrom magr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                       f"    pass\nprint('LOADED', [m for m in {EXPORT_STACK!r} if sys.modules.get(m)])")
    assert "LOADED []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_plain_ppl_prints_only_magr_log_and_imports_no_export_stack(shared):
    done = _run_python(
        "import sys\nfrom magr.cli import main\n"
        "rc = main(['ppl', '--model', 'stories260k', '--eval-sets', 'tinystories', '--eval-seqlen', '64', "
        "'--max-windows', '1', '--device', 'cpu'])\n"
        f"print('LOADED', rc, [m for m in {EXPORT_STACK!r} if sys.modules.get(m)])")
    assert "LOADED 0 []" in done.stdout, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines()
             if line.strip() and " magr." not in line and "it/s]" not in line]  # magr's log and progress bars
    assert not noise, noise
