"""The paper's published numbers (shared/docs/method-notes.md), for the columns beside ours."""
from __future__ import annotations

#: Paper (LLaMA-2, WikiText-2 perplexity, per channel), from shared/docs/method-notes.md.
PAPER_WIKITEXT2 = {
    ("float", "float"): (5.47, 4.88, 3.31),
    ("W4", "RTN"): (6.11, 5.20, 3.67), ("W4", "OPTQ"): (5.83, 5.13, 3.58),
    ("W4", "MagR+RTN"): (5.91, 5.17, 3.58), ("W4", "MagR+OPTQ"): (5.70, 4.97, 3.44),
    ("W3", "RTN"): (539.48, 10.68, 7.52), ("W3", "OPTQ"): (8.37, 6.44, 4.82),
    ("W3", "MagR+RTN"): (8.66, 6.55, 4.64), ("W3", "MagR+OPTQ"): (6.41, 5.41, 3.82),
    ("W2", "OPTQ"): (7.7e3, 2.1e3, 77.95), ("W2", "MagR+OPTQ†"): (16.73, 11.14, 5.95),
}
PAPER_MODELS = ("LLaMA-2-7B", "LLaMA-2-13B", "LLaMA-2-70B")
#: Paper Table 4: wall time on one A100 for LLaMA-2-7B, minutes.
PAPER_RUNTIME_7B_MIN = {"RTN": 5, "MagR+RTN": 20, "OPTQ": 22, "MagR+OPTQ": 35, "MagR+OPTQ†": 150}
