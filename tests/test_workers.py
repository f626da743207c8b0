"""Workers (magr.pipeline.workers): a cell's seeds and perplexity sets in one-thread processes give the numbers of
the same cell run in one process at one thread (the tests' thread count, conftest), bit for bit, and leave the same
files; bad worker settings are refused before any work."""
from __future__ import annotations

import json

import pytest
import torch
from test_faults import assert_same_run

from magr.cli import main
from magr.pipeline.checkpoints import resume_key
from magr.pipeline.workers import check_workers

CELL = ["--model", "stories260k", "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10",
        "--eval-sets", "tinystories", "wikitext2", "--eval-seqlen", "64", "--max-windows", "3", "--eval-batch", "2",
        "--forward-dtype", "bfloat16", "--load", "stream", "--method", "magr+optq", "--bits", "3", "--seeds", "0", "1"]


def run_meta(folder) -> dict:
    meta = json.loads((folder / "magr_run.json").read_text())
    meta.pop("seconds"), meta.pop("block_seconds")
    for entry in meta.get("ppl", {}).values():
        entry.pop("seconds")
    return meta


def test_cell_in_workers_equals_the_one_thread_cell(tmp_path, shared):
    one, two = tmp_path / "one", tmp_path / "two"
    assert torch.get_num_threads() == 1  # conftest: the one-thread reference
    assert main(["quantize", *CELL, "--out", str(one)]) == 0
    assert main(["quantize", *CELL, "--out", str(two), "--workers", "2"]) == 0
    for seed in ("seed-0", "seed-1"):
        assert run_meta(two / seed) == run_meta(one / seed)  # perplexities equal as floats, same order of sets
        assert list(run_meta(two / seed)["ppl"]) == ["tinystories", "wikitext2"]
        layers = [json.loads((f / seed / "magr_layers.json").read_text()) for f in (one, two)]
        strip = [[{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rs] for rs in layers]
        assert strip[0] == strip[1]
        assert not (two / seed / ".blocks").exists()
    assert_same_run(two / "seed-0", one / "seed-0")  # the saved model of the first seed, bit for bit
    assert not list((two / "seed-1").glob("model*.safetensors*"))


def test_ppl_in_workers_equals_one_process(tmp_path, shared):
    args = ["ppl", "--model", "stories260k", "--eval-sets", "tinystories", "wikitext2", "--eval-seqlen", "64",
            "--max-windows", "3", "--forward-dtype", "bfloat16"]
    outs = [tmp_path / "one.json", tmp_path / "two.json"]
    assert main([*args, "--json", str(outs[0])]) == 0
    assert main([*args, "--json", str(outs[1]), "--workers", "2"]) == 0
    ppl = [{k: v["ppl"] for k, v in json.loads(o.read_text())["ppl"].items()} for o in outs]
    assert ppl[0] == ppl[1] and list(ppl[1]) == ["tinystories", "wikitext2"]


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "workers=0 not understood; allowed: an integer >= 1"),
    (["--workers", "2", "--load", "full"], "workers=2 evaluates each seed's model from its block checkpoints"),
    (["--workers", "2", "--eval-seqlen", "100000"], "eval_seqlen"),
])
def test_bad_workers_are_refused_before_any_work(extra, message, tmp_path, capsys):
    args = [a for a in CELL if a not in ("--load", "stream")]
    assert main(["quantize", *args, "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_workers_need_seeds(tmp_path, capsys):
    assert main(["quantize", "--model", "stories260k", "--out", str(tmp_path / "run"), "--workers", "2"]) == 2
    assert "--workers 2 shares a cell's seeds and sets between processes: give --seeds" in capsys.readouterr().err


def test_check_workers():
    assert check_workers(3, "cpu") == 3 and check_workers(1, "cuda") == 1
    for bad in (True, 1.5, "2", -1):
        with pytest.raises(ValueError, match="allowed: an integer >= 1"):
            check_workers(bad, "cpu")
    with pytest.raises(ValueError, match="workers=2 shares a CPU between processes; on device cuda use workers=1"):
        check_workers(2, "cuda")


def test_checkpoints_of_another_thread_count_are_not_resumed(stories260k):
    model, _ = stories260k
    from magr.core.methods import QuantConfig

    cfg, calib = QuantConfig.build(method="rtn", bits=4), torch.zeros(1, 8, dtype=torch.long)
    keys = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        keys.append(resume_key(model, cfg, calib, "cpu"))
    torch.set_num_threads(1)
    assert keys[0]["threads"] == 1 and keys[1]["threads"] == 2
    assert {k: v for k, v in keys[0].items() if k != "threads"} == {k: v for k, v in keys[1].items() if k != "threads"}


def test_a_failing_task_stops_the_pool_and_names_the_error(tmp_path, capsys):
    """A task's error reaches the caller (here: a seed folder that cannot be written) and no worker is left."""
    import multiprocessing

    out = tmp_path / "run"
    out.mkdir()
    (out / "seed-1").write_text("a file where the seed's folder goes")
    assert main(["quantize", *CELL, "--out", str(out), "--workers", "2"]) != 0
    assert "seed-1" in capsys.readouterr().err
    assert multiprocessing.active_children() == []
    (out / "seed-1").unlink()  # the rerun is not refused (no stale run lock of a stopped task) and finishes
    assert main(["quantize", *CELL, "--out", str(out), "--workers", "2"]) == 0
    assert all((out / seed / "magr_run.json").is_file() for seed in ("seed-0", "seed-1"))
