"""Does a fresh run reproduce the committed reports? Compare every reported value with its stated uncertainty.

    python scripts/check_reproduction.py                  # after `make repro`: reports/ vs the committed ones
    python scripts/check_reproduction.py --rerun          # rerun the whole pipeline (dvc repro --force) first
    python scripts/check_reproduction.py --cell w3-optq   # rerun one quantize cell (all seeds) and its tables
    python scripts/check_reproduction.py --rerun --threads 1   # ... with 1 torch thread (another machine's sums)
    python scripts/check_reproduction.py --profile gemma3-270m  # a profile's run (params.yaml = that profile)
                                                                # vs its committed reports/profiles/gemma3-270m

Committed values: reports/metrics.json at a git revision (--committed, default HEAD), written by
scripts/build_report.py (for --profile P: reports/profiles/P/metrics.json, kept by scripts/keep_profile_reports.py);
fresh values: the tables in the working tree's reports/. The rules (magr.reproduction.reported):
a seed-averaged perplexity must fall in the committed rerun interval, a calibration-free one within 1 %, a
zero-shot accuracy of the float or RTN model within one standard error, one of a model that reads calibration data in
the 95 % interval of a second draw on the same items, a Table 1 fraction rank within 1 point, the alpha sweep's
error ratio at the paper's alpha in its interval over layers (its perplexities as Table 2's). Prints one verdict per
value and exits 1 if any value is outside or missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from magr.reproduction.reported import compare, report_values
from magr.reproduction.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def committed_values(rev: str, path: str = "reports/metrics.json") -> dict:
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    return json.loads(text)


def metrics_path(profile: str | None) -> str:
    """Where the committed values of ``profile`` are (None: the default's), after checking that params.yaml is
    that profile: the fresh values come from the pipeline params.yaml runs."""
    import yaml

    running = yaml.safe_load((ROOT / "params.yaml").read_text()).get("profile")
    if profile is None:
        return "reports/metrics.json"
    if running != profile:
        raise SystemExit(f"--profile {profile}: params.yaml is profile {running!r}; run "
                         f"`cp profiles/{profile}.yaml params.yaml` (and the pipeline) first")
    return f"reports/profiles/{profile}/metrics.json"


def run(cmd: list[str], threads: int | None) -> None:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's dvc
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # as the Makefile: local files
        env.setdefault(name, "1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--committed", default="HEAD", help="git revision whose reports/metrics.json is the reference")
    p.add_argument("--rerun", action="store_true", help="rerun the whole pipeline first (dvc repro --force)")
    p.add_argument("--cell", default=None, help="rerun this quantize cell of params.yaml first, then its tables")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the rerun (default: torch's)")
    p.add_argument("--out", default=None, help="also write the verdicts to this CSV file")
    p.add_argument("--profile", default=None, help="check a profile's run against its committed reports "
                   "(reports/profiles/<profile>); params.yaml must be that profile")
    args = p.parse_args(argv)
    reference = metrics_path(args.profile)  # before any rerun
    if args.rerun:
        run(["dvc", "repro", "--force"], args.threads)
    elif args.cell:
        run(["dvc", "repro", "--force", "--single-item", f"quantize@{args.cell}"], args.threads)
        run(["dvc", "repro"], args.threads)
    verdicts = compare(committed_values(args.committed, reference), report_values(ROOT / "reports"))
    print(markdown_table(verdicts, ".4g"))
    counts = verdicts["verdict"].value_counts().to_dict()
    print(f"\n{len(verdicts)} values: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    ranged = verdicts["in seed range"].dropna()
    if len(ranged):
        print(f"{int((~ranged.astype(bool)).sum())} of {len(ranged)} seed-averaged means outside the committed seed "
              "range (shown for information; the rule is the rerun interval)")
    if args.out:
        verdicts.to_csv(args.out, index=False)
    return 0 if set(counts) <= {"within"} else 1


if __name__ == "__main__":
    sys.exit(main())
