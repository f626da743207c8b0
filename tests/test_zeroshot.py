"""Zero-shot tasks on local data: task files mirror lm-eval's built-ins, load offline, score deterministically,
and reject missing or malformed data files with a clear error."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magr.evaluation import zeroshot as zs

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

BUILTIN_DIR = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "arc_easy": BUILTIN_DIR / "arc" / "arc_easy.yaml",
    "arc_challenge": BUILTIN_DIR / "arc" / "arc_challenge.yaml",
    "piqa": BUILTIN_DIR / "piqa" / "piqa.yaml",
    "winogrande": BUILTIN_DIR / "winogrande" / "default.yaml",
}
# rows of the local copies (data/MANIFEST.md)
N_ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267}
MIRRORED = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
            "should_decontaminate", "doc_to_decontamination_query")


def _data_dir() -> Path:
    d = zs.zeroshot_data_dir()
    if not (d / "piqa.jsonl").is_file():
        pytest.skip(f"shared zero-shot data not found in {d}")
    return d


@pytest.fixture(scope="module")
def local_tasks():
    _data_dir()
    return zs.task_manager("local").load([zs.LOCAL_TASKS[t].local_name for t in zs.TASKS])["tasks"]


def _first_records(task: str, n: int = 3) -> list[dict]:
    with (_data_dir() / zs.LOCAL_TASKS[task].file).open() as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def _write_copy(root: Path, task: str, records: list) -> Path:
    path = root / zs.LOCAL_TASKS[task].file
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- task definitions
@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "piqa"])
def test_local_task_files_mirror_builtin_prompts_and_metrics(task):
    builtin = load_yaml(BUILTIN_YAML[task], resolve_func=False)
    local = load_yaml(zs.TASKS_DIR / f"{zs.LOCAL_TASKS[task].local_name}.yaml", resolve_func=False)
    for key in MIRRORED:
        assert local.get(key) == builtin.get(key), key
    assert local["metadata"]["version"] == builtin["metadata"]["version"]
    split_key = {"test": "test_split", "validation": "validation_split"}[zs.LOCAL_TASKS[task].split]
    assert builtin[split_key] == zs.LOCAL_TASKS[task].split
    assert "dataset_path" not in local and callable(load_yaml(
        zs.TASKS_DIR / f"{zs.LOCAL_TASKS[task].local_name}.yaml")["custom_dataset"])


def test_winogrande_partial_scoring_matches_builtin_functions():
    builtin = load_yaml(BUILTIN_YAML["winogrande"])
    local = load_yaml(zs.TASKS_DIR / "magr_winogrande.yaml")
    assert local["metric_list"] == builtin["metric_list"] and local["output_type"] == builtin["output_type"]
    for doc in _first_records("winogrande", 5):
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert local[key](doc) == builtin[key](doc), key
        # partial scoring: the contexts differ only in the option, the continuation is after the blank
        choices = local["doc_to_choice"](doc)
        assert choices[0].endswith(doc["option1"]) and choices[1].endswith(doc["option2"])
        assert doc["sentence"].endswith(local["doc_to_target"](doc))


def test_local_tasks_load_offline_with_all_rows(local_tasks):
    assert set(local_tasks) == {f"magr_{t}" for t in zs.TASKS}
    for t in zs.TASKS:
        task = local_tasks[f"magr_{t}"]
        docs = list(task.eval_docs)
        assert len(docs) == N_ROWS[t]
        gold = task.doc_to_target(docs[0])
        choices = task.doc_to_choice(docs[0])
        assert len(choices) >= 2
        if t == "winogrande":  # gold is picked through doc_to_text (multiple contexts)
            assert task.doc_to_text(docs[0]) in (0, 1)
        else:
            assert 0 <= int(gold) < len(choices)


def test_arc_prompt_renders_question_and_choices(local_tasks):
    rec = _first_records("arc_challenge", 1)[0]
    task = local_tasks["magr_arc_challenge"]
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == f"Question: {rec['question']}\nAnswer:"
    assert task.doc_to_choice(doc) == rec["choices"]["text"]
    assert task.doc_to_target(doc) == rec["choices"]["label"].index(rec["answerKey"])


# ----------------------------------------------------------------------------- scoring a model
def test_stories260k_scores_deterministically(stories260k):
    model, tok = stories260k
    kw = dict(limit=6, batch_size=4)
    first = zs.evaluate_zeroshot(model, tok, **kw)
    second = zs.evaluate_zeroshot(model, tok, **kw)
    assert list(first) == list(zs.TASKS)
    for t in zs.TASKS:
        a, b = first[t], second[t]
        assert a["n"] == 6 and a["source"] == "local" and a["lm_eval_task"] == f"magr_{t}"
        assert a["chance"] == zs.CHANCE[t]
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert a[key] == b[key], (t, key)
        assert 0.0 <= a["acc"] <= 1.0 and a["acc_stderr"] >= 0.0
        # an accuracy over 6 items is a multiple of 1/6
        assert abs(6 * a["acc"] - round(6 * a["acc"])) < 1e-9
        if t == "winogrande":
            assert a["acc_norm"] is None
        else:
            assert 0.0 <= a["acc_norm"] <= 1.0
        assert a["seconds"] > 0
    table = zs.results_table(first)
    assert table.count("\n") == 1 + len(zs.TASKS)
    assert f"{100 * first['piqa']['acc']:.2f}" in table


def test_stories260k_local_data_root(stories260k, tmp_path):
    """An explicit data_root reaches lm-eval's loader: a 2-item copy is scored on its 2 items."""
    recs = _first_records("piqa", 2)
    _write_copy(tmp_path, "piqa", recs)
    res = zs.evaluate_zeroshot(*stories260k, tasks=["piqa"], data_root=tmp_path, batch_size=2)
    assert res["piqa"]["n"] == 2 and res["piqa"]["acc"] in (0.0, 0.5, 1.0)


# ----------------------------------------------------------------------------- bad data files
def test_missing_file_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "winogrande.jsonl"))):
        zs.evaluate_zeroshot(None, None, tasks=["winogrande"], data_root=tmp_path)
    # the same check guards lm-eval's own loading of the task file (CLI use with --include_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "arc_easy.jsonl"))):
        zs.task_manager("local", tmp_path).load(["magr_arc_easy"])["tasks"]["magr_arc_easy"]


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 1: not valid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"goal": "g", "sol1": "a", "sol2": "b"}', r"lacks field\(s\) \['label'\]"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": "0"}', "'label' must be 0 or 1"),
    ('{"goal": 3, "sol1": "a", "sol2": "b", "label": 0}', r"field\(s\) \['goal'\] must be strings"),
])
def test_malformed_piqa_file_gives_clear_error(tmp_path, line, expected):
    path = _write_copy(tmp_path, "piqa", [line])
    with pytest.raises(zs.ZeroshotDataError, match=expected) as info:
        zs.evaluate_zeroshot(None, None, tasks=["piqa"], data_root=tmp_path)
    assert str(path) in str(info.value) and "piqa" in str(info.value)


def test_malformed_record_after_checked_prefix_is_caught_when_loading(tmp_path):
    recs = _first_records("winogrande", zs.N_CHECKED)
    _write_copy(tmp_path, "winogrande", [*recs, {"sentence": "no blank", "option1": "a", "option2": "b",
                                                 "answer": "1"}])
    zs.check_local_file("winogrande", tmp_path)  # the first records are fine
    with pytest.raises(zs.ZeroshotDataError, match=f"line {zs.N_CHECKED + 1}: 'sentence' must contain"):
        zs.load_local_dataset("winogrande", tmp_path)


def test_empty_file_gives_clear_error(tmp_path):
    (tmp_path / "arc_easy.jsonl").write_text("\n")
    with pytest.raises(zs.ZeroshotDataError, match="arc_easy.jsonl.*is empty"):
        zs.check_local_file("arc_easy", tmp_path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(zs.TASKS), data=st.data())
def test_any_missing_hub_field_is_named(tmp_path_factory, task, data):
    field = data.draw(st.sampled_from(zs.LOCAL_TASKS[task].fields))
    rec = _first_records(task, 1)[0]
    del rec[field]
    root = tmp_path_factory.mktemp("data")
    _write_copy(root, task, [rec])
    with pytest.raises(zs.ZeroshotDataError, match=f"lacks field\\(s\\) \\['{field}'\\]"):
        zs.check_local_file(task, root)


def test_arc_answer_key_must_be_a_label(tmp_path):
    rec = _first_records("arc_easy", 1)[0]
    rec["answerKey"] = "Z"
    _write_copy(tmp_path, "arc_easy", [rec])
    with pytest.raises(zs.ZeroshotDataError, match="'answerKey' 'Z' is not one of the labels"):
        zs.check_local_file("arc_easy", tmp_path)


def test_shared_data_files_pass_the_full_check():
    for t in zs.TASKS:
        ds = zs.load_local_dataset(t)
        assert list(ds) == [zs.LOCAL_TASKS[t].split] and len(ds[zs.LOCAL_TASKS[t].split]) == N_ROWS[t]


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, expected", [
    (dict(tasks=["hellaswag"]), "unknown zero-shot task 'hellaswag'; allowed: arc_easy"),
    (dict(tasks=[]), "at least one of"),
    (dict(source="web"), "source must be one of \\('local', 'hub'\\), got 'web'"),
    (dict(limit=0), "limit must be a positive int or None, got 0"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
])
def test_bad_arguments_are_named(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        zs.evaluate_zeroshot(None, None, **kwargs)


def test_results_table_formats_percent_and_missing_values():
    res = {"piqa": {"acc": 0.625, "acc_stderr": 0.0125, "acc_norm": None, "acc_norm_stderr": None, "n": 8,
                    "seconds": 1.5, "chance": 0.5}}
    table = zs.results_table(res)
    assert "| piqa | 8 | 62.50 ± 1.25 | - | 50.00 | 1.5 |" in table.splitlines()


def test_hub_source_requests_builtin_tasks(monkeypatch):
    """source="hub" asks lm-eval's default TaskManager for the built-in names, which exist in this lm-eval."""
    from lm_eval.tasks import TaskManager

    class Stop(Exception):
        pass

    requested = []

    class FakeManager:
        def load(self, names):
            requested.extend(names)
            raise Stop

    monkeypatch.setattr(zs, "task_manager", lambda source, data_root: FakeManager() if source == "hub" else None)
    monkeypatch.setattr(zs, "wrap_model", lambda *a, **k: object())
    with pytest.raises(Stop):
        zs.evaluate_zeroshot(None, None, tasks=["winogrande"], source="hub", data_root="/nonexistent")
    assert requested == ["winogrande"]
    builtin = TaskManager(include_path=[str(p.parent) for p in BUILTIN_YAML.values()], include_defaults=False)
    assert set(zs.TASKS) <= set(builtin.all_tasks)


def test_cli_data_root_is_the_data_folder_of_every_command(data_root, tmp_path, capsys):
    """`magr zeroshot --data-root` takes the same folder as `magr ppl` (the sets live in its zeroshot/)."""
    from magr.cli import main

    out = tmp_path / "zs" / "r.json"
    assert main(["zeroshot", "--model", "stories260k", "--data-root", str(data_root), "--tasks", "piqa",
                 "--limit", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["piqa"]["n"] == 2
