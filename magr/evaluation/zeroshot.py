"""Zero-shot accuracy (paper Table 3) with lm-evaluation-harness, from local data or the hub.

Four multiple-choice tasks: ARC-Easy, ARC-Challenge (4 choices, chance 25%), PIQA and Winogrande (2 choices,
chance 50%). Each item is scored by the log-likelihood of every choice given the prompt;
acc = mean_i [argmax_c loglik(c | x_i) == gold_i], acc_norm the same with loglik divided by the choice's
length in bytes. Winogrande uses partial scoring: the context is the sentence up to the blank filled with
each option, the scored continuation is the text after the blank.

`source="local"` runs the task files shipped in `magr/evaluation/tasks/` (`magr_arc_easy`, ...): lm-eval's built-in
prompts, targets and metrics, with the data read from jsonl copies of the hub datasets (by default
`<shared>/data/zeroshot/`, shared root from env `MAGR_SHARED`). `source="hub"` runs lm-eval's built-in
tasks of the same names, which download their data from the Hugging Face hub.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline.sources import shared_root

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande")
SOURCES: tuple[str, ...] = ("local", "hub")
TASKS_DIR = Path(__file__).with_name("tasks")
"""Folder of the local lm-eval task files (pass it to lm-eval as `--include_path`)."""
CHANCE: dict[str, float] = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5}
"""Accuracy of a uniform random guess (ARC: four choices for all but 11 + 7 items)."""
FEWSHOT_SEED = 1234
"""lm-eval's default few-shot seed (unused at zero shots, set for parity with simple_evaluate)."""
N_CHECKED = 5
"""How many leading records of a local file are checked against the hub schema before evaluation."""


class ZeroshotDataError(ValueError):
    """A local zero-shot data file is malformed (not jsonl, or records without the hub schema's fields)."""


# ----------------------------------------------------------------------------- hub schemas
def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _check_arc(rec: Mapping[str, Any]) -> str | None:
    ch = rec.get("choices")
    if not isinstance(ch, Mapping) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
        return "'choices' must be {'text': [str, ...], 'label': [str, ...]}"
    if len(ch["text"]) != len(ch["label"]) or len(ch["text"]) < 2:
        return f"'choices' text/label must have the same length >= 2, got {len(ch['text'])}/{len(ch['label'])}"
    if rec.get("answerKey") not in ch["label"]:
        return f"'answerKey' {rec.get('answerKey')!r} is not one of the labels {ch['label']}"
    return None


def _check_piqa(rec: Mapping[str, Any]) -> str | None:
    if rec.get("label") not in (0, 1) or isinstance(rec.get("label"), bool):
        return f"'label' must be 0 or 1, got {rec.get('label')!r}"
    return None


def _check_winogrande(rec: Mapping[str, Any]) -> str | None:
    if "_" not in rec["sentence"]:
        return "'sentence' must contain the blank '_'"
    if rec.get("answer") not in ("1", "2"):
        return f"'answer' must be the string '1' or '2', got {rec.get('answer')!r}"
    return None


@dataclass(frozen=True)
class LocalTask:
    """A local copy of a hub dataset: jsonl file, the split name the built-in task reads, the hub schema."""

    name: str  # lm-eval built-in task name
    file: str  # jsonl file name inside the data root
    split: str  # split of the built-in task (test for ARC, validation for PIQA / Winogrande)
    fields: tuple[str, ...]  # fields every record must have
    text_fields: tuple[str, ...]  # those of them that must be strings
    check: Callable[[Mapping[str, Any]], str | None]  # further schema checks; None when the record is fine
    schema: str  # human-readable schema for error messages

    @property
    def local_name(self) -> str:
        """Name of the task file in `magr/evaluation/tasks/` (`magr_<name>`)."""
        return f"magr_{self.name}"


_ARC_SCHEMA = "allenai/ai2_arc: {id, question, choices: {text: [...], label: [...]}, answerKey}"
_ARC_FIELDS = ("id", "question", "choices", "answerKey")
LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("arc_easy", "arc_easy.jsonl", "test", _ARC_FIELDS, ("id", "question", "answerKey"),
                  _check_arc, _ARC_SCHEMA),
        LocalTask("arc_challenge", "arc_challenge.jsonl", "test", _ARC_FIELDS, ("id", "question", "answerKey"),
                  _check_arc, _ARC_SCHEMA),
        LocalTask("piqa", "piqa.jsonl", "validation", ("goal", "sol1", "sol2", "label"), ("goal", "sol1", "sol2"),
                  _check_piqa, "piqa: {goal, sol1, sol2, label: 0|1}"),
        LocalTask("winogrande", "winogrande.jsonl", "validation", ("sentence", "option1", "option2", "answer"),
                  ("sentence", "option1", "option2"), _check_winogrande,
                  "winogrande: {sentence with '_', option1, option2, answer: '1'|'2'}"),
    )
}


# ----------------------------------------------------------------------------- local files
def zeroshot_data_dir(data_root: str | os.PathLike | None = None) -> Path:
    """Folder holding the four jsonl files: `data_root` if given, else `<shared root>/data/zeroshot`."""
    return Path(data_root) if data_root is not None else shared_root() / "data" / "zeroshot"


def _get_task(task: str) -> LocalTask:
    if task not in LOCAL_TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; allowed: {', '.join(TASKS)}")
    return LOCAL_TASKS[task]


def check_local_file(task: str, data_root: str | os.PathLike | None = None, n_check: int = N_CHECKED) -> Path:
    """Check that `task`'s jsonl file exists and its first `n_check` records have the hub schema; return its path.

    Raises FileNotFoundError (missing file) or ZeroshotDataError (bad json, missing or ill-typed fields).
    """
    spec = _get_task(task)
    path = zeroshot_data_dir(data_root) / spec.file
    if not path.is_file():
        raise FileNotFoundError(
            f"zero-shot data file for task {task!r} not found: {path} (expected a jsonl file with records "
            f"{spec.schema}; set data_root or the env var MAGR_SHARED to the folder holding data/zeroshot/)")
    n_seen = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if n_seen >= n_check:
                break
            if not line.strip():
                continue
            n_seen += 1
            _check_record(spec, path, lineno, line)
    if n_seen == 0:
        raise ZeroshotDataError(f"zero-shot data file {path} for task {task!r} is empty; expected jsonl records "
                                f"{spec.schema}")
    return path


def _check_record(spec: LocalTask, path: Path, lineno: int, line: str) -> dict[str, Any]:
    where = f"{path}, line {lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ZeroshotDataError(f"{where}: not valid JSON ({e.msg}); expected one record {spec.schema} per "
                                f"line") from None
    if not isinstance(rec, dict):
        raise ZeroshotDataError(f"{where}: expected a JSON object {spec.schema}, got {type(rec).__name__}")
    missing = [f for f in spec.fields if f not in rec]
    if missing:
        raise ZeroshotDataError(f"{where}: record lacks field(s) {missing} of the {spec.name} hub schema "
                                f"{spec.schema}; found fields {sorted(rec)}")
    bad = [f for f in spec.text_fields if not _is_str(rec[f])]
    if bad:
        raise ZeroshotDataError(f"{where}: field(s) {bad} must be strings ({spec.schema})")
    problem = spec.check(rec)
    if problem:
        raise ZeroshotDataError(f"{where}: {problem} ({spec.schema})")
    return rec


def load_local_dataset(task: str, data_root: str | os.PathLike | None = None):
    """The local copy of `task` as a `datasets.DatasetDict` with the single split the built-in task reads.

    Every record is checked against the hub schema (clear error naming the file and line otherwise).
    """
    import datasets

    spec = _get_task(task)
    path = check_local_file(task, data_root)
    with path.open(encoding="utf-8") as fh:
        rows = [_check_record(spec, path, i, line) for i, line in enumerate(fh, start=1) if line.strip()]
    logger.info("loaded %d %s items from %s", len(rows), task, path)
    return datasets.DatasetDict({spec.split: datasets.Dataset.from_list(rows)})


# ----------------------------------------------------------------------------- evaluation
def _check_args(tasks: Sequence[str], source: str, limit: int | None, batch_size: int) -> tuple[str, ...]:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks must name at least one of {TASKS}")
    for t in tasks:
        _get_task(t)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return tasks


def task_manager(source: str = "local", data_root: str | os.PathLike | None = None):
    """An lm-eval TaskManager: the local task files (data from `data_root`) or lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    if source == "hub":
        return TaskManager()
    if source != "local":
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    root = zeroshot_data_dir(data_root).resolve()
    # the metadata reaches the tasks' custom_dataset loaders (magr/evaluation/tasks/utils.py) as keyword arguments
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_root": str(root)})


def wrap_model(model, tokenizer, batch_size: int = 8, device: str | None = None):
    """lm-eval's HFLM around an in-memory causal LM and tokenizer (no save / reload).

    `device` moves the model there first (in place); None leaves it where it is.
    """
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _metric(res: Mapping[str, Any], name: str) -> float | None:
    v = res.get(f"{name},none")
    return None if v is None or v == "N/A" else float(v)


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    source: str = "local",
    data_root: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model on `tasks`, one lm-eval run per task (timed separately).

    limit: first `limit` items of each task (None: all). source: "local" (jsonl copies under `data_root`,
    default `<shared>/data/zeroshot`) or "hub" (lm-eval's built-in tasks, needs hub access).
    Returns {task: {acc, acc_stderr, acc_norm, acc_norm_stderr (None for winogrande), n, seconds,
    chance, source, lm_eval_task}}.
    """
    tasks = _check_args(tasks, source, limit, batch_size)
    if source == "local":  # fail before lm-eval starts, with the file named
        for t in tasks:
            check_local_file(t, data_root)
    from lm_eval.evaluator import evaluate

    tm = task_manager(source, data_root)
    lm = wrap_model(model, tokenizer, batch_size=batch_size, device=device)
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        name = LOCAL_TASKS[t].local_name if source == "local" else t
        logger.info("zero-shot %s (%s, limit=%s, batch_size=%d)", t, name, limit, batch_size)
        t0 = time.perf_counter()
        loaded = tm.load([name])
        for task_obj in loaded["tasks"].values():  # zero-shot, as simple_evaluate sets up a task by default
            if task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
            task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)
        # lm-eval's evaluate() rather than simple_evaluate(): the same scoring without the per-call
        # environment report (torch.utils.collect_env spawns subprocesses, seconds per call on a busy CPU)
        ev = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
        seconds = time.perf_counter() - t0
        res = ev["results"][name]
        n = ev.get("n-samples", {}).get(name, {}).get("effective")
        out[t] = {
            "acc": _metric(res, "acc"),
            "acc_stderr": _metric(res, "acc_stderr"),
            "acc_norm": _metric(res, "acc_norm"),
            "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
            "n": int(n) if n is not None else None,
            "seconds": seconds,
            "chance": CHANCE[t],
            "source": source,
            "lm_eval_task": name,
        }
        logger.info("%s: acc=%.4f acc_norm=%s n=%s (%.1f s)", t, out[t]["acc"], out[t]["acc_norm"], n, seconds)
    return out


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.1f}"


def format_acc(value: float | None, stderr: float | None) -> str:
    """An accuracy in % with its standard error: '51.56 ± 1.03' ('-' when missing)."""
    return _fmt(value) if value is None or stderr is None else f"{_fmt(value)} ± {_fmt(stderr)}"


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of `evaluate_zeroshot` results (accuracies in %, +- one standard error)."""
    lines = ["| task | n | acc (%) | acc_norm (%) | chance (%) | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for task, r in results.items():
        acc = format_acc(r.get("acc"), r.get("acc_stderr"))
        norm = format_acc(r.get("acc_norm"), r.get("acc_norm_stderr"))
        lines.append(f"| {task} | {r.get('n', '-')} | {acc} | {norm} | {_fmt(r.get('chance', CHANCE.get(task)))} "
                     f"| {_fmt(r.get('seconds'), pct=False)} |")
    return "\n".join(lines)
