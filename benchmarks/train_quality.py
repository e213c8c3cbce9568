"""Does each tiny preset learn? Runs ``fastssl train <method> --preset tiny`` for every method,
as the README's main command does, and records the teacher's (or the network's) kNN top-1
on the built-in dataset's held-out images at random init and at the end, the loss at the
first and last step, and the command's wall time.

    python benchmarks/train_quality.py                  # every method; writes results/cpu/train_quality.*
    python benchmarks/train_quality.py --methods dino   # some of them; the others' rows are kept
    python benchmarks/train_quality.py --smoke          # 5 steps each, into a temporary directory
    python benchmarks/train_quality.py --readme         # only the README's table, from results/cpu/

Goal: every preset ends at least 5 points of kNN top-1 above its random init, and each whole
command takes at most 8 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastssl.benchmark import current_commit, readme_table_from, replace_marked_section
from fastssl.train.config import METHODS

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- train-quality:begin -->", "<!-- train-quality:end -->"
GOAL_POINTS, GOAL_SECONDS = 5.0, 8 * 60


def run_preset(method: str, output: Path, smoke: bool) -> dict:
    """One ``fastssl train`` command; its numbers from the run's log.jsonl."""
    command = [sys.executable, "-m", "fastssl.train", method, "--preset", "tiny", "--output-dir", str(output),
               "--progress", "off", *(["--max-steps", "5"] if smoke else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    losses = [record for record in records if "loss" in record]
    knn = {record["step"]: record["knn_top1"] for record in records if "knn_top1" in record}
    warnings = [record["warning"] for record in records if "warning" in record]
    start_knn, end_knn = knn[min(knn)], knn[max(knn)]
    return dict(method=method, steps=max(knn), seconds=seconds, loss_start=losses[0]["loss"],
                loss_end=losses[-1]["loss"], knn_random_init=start_knn, knn_end=end_knn,
                knn_gain=end_knn - start_knn, learns=end_knn - start_knn >= GOAL_POINTS,
                within_time=seconds <= GOAL_SECONDS, warnings=warnings)


def markdown(document: dict) -> str:
    return "\n".join(["# Tiny presets on the CPU: do they learn?", "", table(document)]) + "\n"


def table(document: dict) -> str:
    lines = [f"`fastssl train <method> --preset tiny` on {document['machine']}. Goal: kNN top-1 at least "
             f"{GOAL_POINTS:g} points above random init, whole command at most {GOAL_SECONDS // 60} minutes.", "",
             "| method | steps | kNN top-1 random init -> end | gain | loss start -> end | wall time | goal met | "
             "commit |", "|---|---:|---|---:|---|---:|---|---|"]
    for row in document["runs"]:
        met = "yes" if row["learns"] and row["within_time"] else "**no**"
        lines.append(f"| {row['method']} | {row['steps']} | {row['knn_random_init']:.1f}% -> {row['knn_end']:.1f}% "
                     f"| {row['knn_gain']:+.1f} | {row['loss_start']:.3g} -> {row['loss_end']:.3g} | "
                     f"{row['seconds']:.0f} s | {met} | {row['commit']} |")
    return "\n".join(lines)


def with_earlier_rows(runs: list[dict]) -> list[dict]:
    """These runs, and the committed rows of the methods not run now (each row names its commit)."""
    path = RESULTS / "train_quality.json"
    earlier = json.loads(path.read_text())["runs"] if path.exists() else []
    ran = {row["method"] for row in runs}
    rows = [row for row in earlier if row["method"] not in ran and row["method"] in METHODS] + runs
    return sorted(rows, key=lambda row: METHODS.index(row["method"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="5 steps per method, results to a temporary directory")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README's table from "
                                                              "results/cpu/train_quality.json")
    args = parser.parse_args()
    if args.readme:
        return readme_table_from(RESULTS / "train_quality.json", BEGIN, END, table)
    commit = current_commit()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="fastssl-train-quality-") as work:
        runs = []
        for method in args.methods:
            runs.append(dict(run_preset(method, Path(work) / method, args.smoke), commit=commit, date=date))
            print(f"{method}: kNN {runs[-1]['knn_random_init']:.1f}% -> {runs[-1]['knn_end']:.1f}%, "
                  f"{runs[-1]['seconds']:.0f} s", flush=True)
    document = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    smoke=args.smoke, runs=runs if args.smoke else with_earlier_rows(runs))
    out = Path(tempfile.mkdtemp(prefix="fastssl-train-quality-smoke-")) if args.smoke else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_quality.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "train_quality.md").write_text(markdown(document))
    if not args.smoke and {row["method"] for row in document["runs"]} == set(METHODS):
        replace_marked_section(README, BEGIN, END, table(document))
    print(f"wrote {out / 'train_quality'}.json/.md")
    return 0 if args.smoke or all(row["learns"] and row["within_time"] for row in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
