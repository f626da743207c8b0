"""Pre-flight checks (each bad argument or resource is a clear error before any long work), strict JSON,
atomic writes and checkpoint removal."""
from __future__ import annotations

import json
import math

import pytest
import torch

from magr.pipeline import preflight
from magr.cli import main
from magr.pipeline.calibration_data import Calibration
from magr.evaluation.perplexity import Evaluation
from magr.core.methods import QuantConfig
from magr.pipeline.persistence import atomic_open, dumps, write_json
from magr.runs import perplexity_run, quantize_run

ARGS = ["--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10", "--bits", "3"]


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the weights are loaded or a block is quantized."""
    import magr.pipeline.blocks as pipeline
    import magr.runs as runs

    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a: pytest.fail("a block was quantized"))


def _run(out, quant=None, **kw):
    return quantize_run(kw.pop("model", "stories260k"), out, quant or QuantConfig.build(method="rtn"),
                        kw.pop("calibration", Calibration("tinystories", 4, 64)), progress=False, **kw)


# ------------------------------------------------------------------------------------- output folder
def test_output_folder_checks(tmp_path, shared):
    from magr.pipeline.sources import stories260k_path

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        preflight.check_output(afile, "stories260k")
    with pytest.raises(ValueError, match="is the input model's folder"):
        preflight.check_output(stories260k_path(), "stories260k")
    with pytest.raises(ValueError, match=r"is not writable: Not a directory"):
        preflight.check_output(afile / "sub", "stories260k")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a magr run folder \(it holds 1 other entries, e.g. 'thesis.tex'\)"):
        preflight.check_output(foreign, "stories260k")
    (foreign / ".blocks").mkdir()  # an interrupted run's folder is a run folder
    preflight.check_output(foreign, "stories260k")
    (foreign / "magr_qparams.safetensors").write_bytes(b"")  # ... with a saved model: --no-save would mix
    with pytest.raises(ValueError, match="holds the saved model of an earlier run"):
        preflight.check_output(foreign, "stories260k", save=False)
    new = tmp_path / "a" / "b"
    preflight.check_output(new, "stories260k")
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind


def test_unwritable_out_with_no_save_fails_before_loading(tmp_path, no_long_work, shared):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        _run(tmp_path / "afile" / "run", save=False)


# ------------------------------------------------------------------------------------- model checks
def test_unsupported_architecture_refused_from_its_config(tmp_path, no_long_work, shared):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"unsupported model class GPT2LMHeadModel.*LlamaForCausalLM"):
        _run(tmp_path / "out", model=str(tmp_path / "gpt2"))


@pytest.mark.parametrize("kw, message", [
    ({"calibration": Calibration("tinystories", 2, 1024)},
     r"calibration seqlen=1024 exceeds the model's context \(max_position_embeddings=512\); allowed: at most 512"),
    ({"evaluation": Evaluation(("tinystories",), eval_seqlen=600)}, r"eval_seqlen=600 exceeds the model's context"),
    ({"quant": QuantConfig.build(method="rtn", group_size=64)}, r"group_size 64 does not divide the input size 172"),
    ({"device": "cuda:9"}, r"device 'cuda:9'"),
    ({"dtype": "float64"}, r"dtype='float64' not supported"),
    ({"model": "/nonexistent/model"}, r"model '/nonexistent/model' not found: no such folder or .gguf file"),
])
def test_bad_run_arguments_fail_before_loading(kw, message, tmp_path, no_long_work, shared):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _run(tmp_path / "out", **kw)


def test_eval_text_shorter_than_one_window_fails_before_quantizing(tmp_path, monkeypatch, shared):
    import magr.pipeline.blocks as pipeline

    monkeypatch.setattr(pipeline, "quantize_block", lambda *a: pytest.fail("a block was quantized"))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    with pytest.raises(ValueError, match=rf"evaluation set '{short}': only \d+ tokens: not enough for one window of "
                                         r"seqlen=128; use a longer text or a smaller eval_seqlen"):
        _run(tmp_path / "out", evaluation=Evaluation((str(short),), eval_seqlen=128))
    with pytest.raises(ValueError, match="eval_seqlen=600 exceeds the model's context"):
        perplexity_run("stories260k", Evaluation(("tinystories",), eval_seqlen=600))


def test_check_finite_names_the_first_bad_tensor_and_index():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    preflight.check_finite(net)
    with torch.no_grad():
        net[1].weight[1, 2] = float("-inf")
        net[1].weight[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1.weight has a non-finite value \(nan\) at index \[0, 3\] \(2 of 8 values"):
        preflight.check_finite(net)


def test_disk_space_estimate_matches_what_a_run_writes_and_is_checked(tmp_path, monkeypatch, shared):
    from magr.pipeline.models import load_model

    net, _ = load_model("stories260k")
    out = tmp_path / "run"
    assert main(["quantize", "--model", "stories260k", "--out", str(out), *ARGS, "--keep-checkpoints"]) == 0
    (ckpt, need_ckpt, _), (_, need_out, _) = preflight.estimate_bytes(net, None, out, True, tmp_path / "new")
    written_ckpt = sum(f.stat().st_size for f in (out / ".blocks").glob("*.*") if f.suffix in (".pt", ".safetensors"))
    written_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.8 * written_ckpt < need_ckpt < 1.2 * written_ckpt
    assert 0.8 * written_out < need_out < 1.2 * written_out
    # a streamed run links its checkpoints as the saved model's block shards: only the rest takes new space
    need_linked = preflight.estimate_bytes(net, None, out, True, out / ".blocks", linked=True)[1][1]
    rest = written_out - sum(f.stat().st_size for f in (out / ".blocks").glob("*.safetensors"))
    assert 0.8 * rest < need_linked < 1.2 * rest
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": need_out // 2})())
    with pytest.raises(ValueError, match=r"not enough disk space: 0.00\d GB needed \(block checkpoints .* quantized model"):
        preflight.check_disk_space(net, None, tmp_path / "x", True, tmp_path / "x" / ".blocks")


# ------------------------------------------------------------------------------------ files and JSON
def test_strict_json_writes_null_for_non_finite_numbers(tmp_path, caplog):
    write_json(tmp_path / "r.json", {"a": [1.0, float("nan")], "b": {"c": float("inf")}})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"a": [1.0, None], "b": {"c": None}}
    assert "$.a[1]" in caplog.text and "$.b.c" in caplog.text
    assert dumps({"x": math.nan}) == '{\n "x": null\n}'


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with atomic_open(path, "w") as f:
            f.write("new, half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_checkpoints_removed_after_success_unless_kept(tmp_path, shared):
    assert main(["quantize", "--model", "stories260k", "--out", str(tmp_path / "a"), *ARGS]) == 0
    assert not (tmp_path / "a" / ".blocks").exists()
    assert main(["quantize", "--model", "stories260k", "--out", str(tmp_path / "b"), *ARGS, "--keep-checkpoints"]) == 0
    assert len(list((tmp_path / "b" / ".blocks").glob("block_*.pt"))) == 5
    # the kept checkpoints make a rerun of the same command resume every block
    assert main(["quantize", "--model", "stories260k", "--out", str(tmp_path / "b"), *ARGS]) == 0
    assert json.loads((tmp_path / "b" / "magr_run.json").read_text())["resumed_blocks"] == [0, 1, 2, 3, 4]
