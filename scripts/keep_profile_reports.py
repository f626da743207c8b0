"""Keep a profile's reports beside the default's: copy what the profile's pipeline wrote under reports/ into
``<dest>/<profile>/`` with a README.md that says which command, commit and machine made them.

    git clone /path/to/magr prof && cd prof                   # a clone: the profile replaces the default's reports
    cp profiles/gemma3-270m.yaml params.yaml
    OMP_NUM_THREADS=1 make repro                               # (the threads the runs used go into the README)
    python scripts/keep_profile_reports.py --dest /path/to/magr/reports/profiles --threads 1
    # or, from another tree: python /path/to/magr/scripts/keep_profile_reports.py --root prof --dest ...

What is copied is derived, not listed: every output under reports/ of every stage in dvc.lock (so files of the
default that the profile's stages do not write stay behind) and reports/pipeline_wall_time.md (written by
`make repro`). REPORT.md and metrics.json are then rebuilt from the kept files alone (scripts/build_report.py of
this tree): the clone's report stage also read the default's committed files under reports/ (its "outside the
pipeline" sections are about the default's model). The kept metrics.json is the reference of
``scripts/check_reproduction.py --profile <profile>``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from magr.pipeline.machine import machine_info

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def report_outputs(root: Path) -> list[str]:
    """The paths under reports/ that the stages of ``root``'s dvc.lock wrote, and the wall-time table."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise FileNotFoundError(f"{lock} not found: run the profile's pipeline (`make repro`) in {root} first")
    stages = yaml.safe_load(lock.read_text())["stages"]
    outs = sorted({o["path"] for s in stages.values() for o in s.get("outs", []) if o["path"].startswith("reports/")})
    if (root / "reports/pipeline_wall_time.md").is_file():
        outs.append("reports/pipeline_wall_time.md")
    missing = [p for p in outs if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"outputs named in dvc.lock are missing: {', '.join(missing)}; rerun `dvc repro`")
    return outs


def git(*args: str, root: Path) -> str:  # rstrip: a porcelain line may start with a space
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.rstrip()


def commit_of(tree: Path) -> str:
    """HEAD of ``tree``, marked when files other than a pipeline's (params.yaml, dvc.lock, reports/) changed."""
    changed = [ln for ln in git("status", "--porcelain", "--untracked-files=no", root=tree).splitlines()
               if not ln.endswith(("params.yaml", "dvc.lock")) and not ln[3:].startswith("reports/")]
    return git("rev-parse", "HEAD", root=tree) + (" (with uncommitted changes)" if changed else "")


def rebuild_report(root: Path, dest: Path) -> None:
    """REPORT.md and metrics.json of ``dest`` from its files alone, by this tree's build_report.py, run in ``root``
    (the profile's params.yaml; its model folder for the window protocol)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this magr
    subprocess.run([sys.executable, str(HERE / "build_report.py"), "--params", "params.yaml", "--reports", str(dest),
                    "--out", str(dest / "REPORT.md"), "--metrics", str(dest / "metrics.json")],
                   cwd=root, check=True, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", required=True, help="folder that gets <profile>/ (e.g. the main tree's reports/profiles)")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the profile's clone, where it ran (default: this script's tree)")
    p.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "torch's default"),
                   help="the torch threads the runs used, for the README (default: $OMP_NUM_THREADS)")
    p.add_argument("--note", default="", help="a line for the README (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    params = yaml.safe_load((root / "params.yaml").read_text())
    profile = params.get("profile")
    if not profile or not (root / "profiles" / f"{profile}.yaml").is_file():
        raise SystemExit(f"params.yaml names profile {profile!r}, which is not in profiles/; copy a profile to "
                         "params.yaml and run it first")
    if (root / "profiles" / f"{profile}.yaml").read_text() != (root / "params.yaml").read_text():
        raise SystemExit(f"params.yaml differs from profiles/{profile}.yaml: keep only the reports of a profile as "
                         "it is committed")
    outs = report_outputs(root)
    dest = Path(args.dest).resolve() / profile
    staging = dest.with_name(f".{profile}.keeping")  # made whole first: a failure leaves the kept copy as it was
    if staging.exists():
        shutil.rmtree(staging)
    for rel in outs:
        src, dst = root / rel, staging / Path(rel).relative_to("reports")
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    rebuild_report(root, staging)

    info = machine_info()
    lines = [f"# Profile `{profile}`: its reports, as its pipeline wrote them", "",
             f"- command: `cp profiles/{profile}.yaml params.yaml && make repro` (torch threads: {args.threads})",
             f"- commit: {commit_of(root)}",
             f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, GPU {info['gpu']}; "
             f"torch {info['torch']}, transformers {info['transformers']}",
             f"- kept: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} by `python "
             f"scripts/keep_profile_reports.py` (every output under reports/ in dvc.lock, and pipeline_wall_time.md); "
             f"REPORT.md and metrics.json rebuilt from these files alone by scripts/build_report.py at "
             f"{commit_of(ROOT)}",
             f"- check: `cp profiles/{profile}.yaml params.yaml && make repro && python scripts/check_reproduction.py "
             f"--profile {profile}`"]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += ["", "The report: [REPORT.md](REPORT.md); wall time per stage: [pipeline_wall_time.md](pipeline_wall_time.md).",
              ""]
    (staging / "README.md").write_text("\n".join(lines))
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    print(f"kept {len(outs)} outputs of profile {profile} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
