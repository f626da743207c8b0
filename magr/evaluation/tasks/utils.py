"""Loaders and Winogrande prompt functions for the local lm-eval task files in this folder.

lm-eval calls a task's `custom_dataset` with the task metadata as keyword arguments; `data_root` (the
folder of the jsonl files) comes from `TaskManager(metadata={"data_root": ...})` or the CLI's
`--metadata '{"data_root": "..."}'`; without it the default `<shared>/data/zeroshot` is used.
The Winogrande functions are copies of lm-eval's `tasks/winogrande/preprocess_winogrande.py`.
"""
from magr.evaluation.zeroshot import load_local_dataset


def load_arc_easy(data_root=None, **_metadata):
    return load_local_dataset("arc_easy", data_root)


def load_arc_challenge(data_root=None, **_metadata):
    return load_local_dataset("arc_challenge", data_root)


def load_piqa(data_root=None, **_metadata):
    return load_local_dataset("piqa", data_root)


def load_winogrande(data_root=None, **_metadata):
    return load_local_dataset("winogrande", data_root)


def winogrande_doc_to_text(doc):
    """Index of the gold option: its filled-in prefix is the context (partial scoring)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    """The scored continuation: the sentence after the blank."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    """The two contexts: the sentence up to the blank, filled with option1 / option2."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
