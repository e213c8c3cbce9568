"""Run the accuracy tests over many seeds and tabulate how close each bound comes to failing.

    python tests/stress.py --seeds 200                  # every accuracy test, seed indices 0..199
    python tests/stress.py --seeds 50 tests/test_soft_sort.py -k gradient
    python tests/stress.py --seeds 200 --resume         # go on with a stopped run: only the seeds it lacks
    python tests/stress.py --summarize .stress          # tabulate the logs of a run (also a partial one)
    python tests/stress.py --summarize .stress --save   # their tests' rows into tests/stress.{json,md}, README
    python tests/stress.py --readme                     # README's table from tests/stress.json

An accuracy test is one that makes at least one comparison through tests/accuracy.py. Seed
index 0 is the seed the default ``pytest`` run uses, so the first pass runs every selected
test once and finds them; the other seeds run in ``--jobs`` pytest processes, each logging
every test's checks (``--accuracy-log``). For each test the table gives the seeds run, the
failures, and the worst and the median over seeds of the largest ``error / bound`` of its
checks (a check fails above 1). ``--seeds 200`` over the whole suite takes hours on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from fastssl.benchmark import replace_marked_section

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SUMMARY = TESTS / "stress.json"
TABLE = TESTS / "stress.md"
BEGIN, END = "<!-- stress:begin -->", "<!-- stress:end -->"


def update_readme(rows: list[dict]) -> bool:
    return replace_marked_section(REPO / "README.md", BEGIN, END, file_table(rows))


def pytest_command(selection: list[str], log: Path, *options: str) -> list[str]:
    # Options as --name=value: pytest would take a bare path argument as a rootdir hint. Only a
    # failed test keeps its temporary directory: the trainer tests write checkpoints, over 20 GB
    # per process in 200 seeds.
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}",
            "-o", "tmp_path_retention_policy=failed", f"--accuracy-log={log}", *options, *selection]


def collected_tests(selection: list[str]) -> set[str]:
    """The ids pytest collects for ``selection`` now (a renamed parametrization drops its old id)."""
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              f"--rootdir={REPO}", *selection], cwd=REPO, capture_output=True, text=True)
    return {line.strip() for line in listing.stdout.splitlines() if "::" in line}


def run(selection: list[str], seeds: int, jobs: int, out: Path, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    listed = out / "accuracy_tests.txt"
    selected = collected_tests(selection)
    if not (resume and listed.exists()):
        for stale in out.glob("*.jsonl"):
            stale.unlink()
        print("== seed index 0: every selected test, to find the accuracy tests", flush=True)
        subprocess.run(pytest_command(selection, out / "seed0.jsonl"), cwd=REPO)
    else:
        # Tests added (or renamed) since the run began: their seed index 0 finds which compare.
        new = selected - {line["test"] for line in read_logs(out)}
        if new:
            print(f"== seed index 0 for {len(new)} tests new since the run began", flush=True)
            named = out / "new_tests.txt"
            named.write_text("\n".join(sorted(new)) + "\n")
            subprocess.run(pytest_command(selection, out / f"seed0-{len(list(out.glob('seed0*.jsonl')))}.jsonl",
                                          f"--tests-from={named}"), cwd=REPO)
    logs = read_logs(out)
    found = sorted({line["test"] for line in logs if line["checks"]})
    listed.write_text("\n".join(found) + "\n")
    accuracy_tests = [test for test in found if test in selected]
    seeds_run = defaultdict(set)
    for line in logs:
        seeds_run[line["test"]].add(line["seed_index"])
    missing = [(test, index) for test in accuracy_tests for index in range(seeds) if index not in seeds_run[test]]
    if not missing:
        print(f"== every accuracy test already has seed indices 0..{seeds - 1}", flush=True)
        return
    pending = out / "pending_tests.txt"
    pending.write_text("".join(f"{test}\t{index}\n" for test, index in missing))
    # Each process takes a range of seed indices holding about as many of the missing runs.
    indices = sorted(index for _, index in missing)
    bounds = sorted({indices[len(indices) * job // jobs] for job in range(jobs)}) + [seeds]
    print(f"== {len(missing)} runs of {len({test for test, _ in missing})} of {len(accuracy_tests)} accuracy "
          f"tests, seed indices {indices[0]}..{indices[-1]}, in {len(bounds) - 1} processes", flush=True)
    # New logs never overwrite old ones: numbered after the highest shard number in use.
    attempt = 1 + max((log_order(log)[1] for log in out.glob("shard*.jsonl")), default=-1)
    # One thread per process: more threads than cores make OpenMP's spinning workers crawl.
    environment = {**os.environ, "FASTSSL_TEST_THREADS": "1"}
    processes = [subprocess.Popen(pytest_command(selection, out / f"shard{attempt + job}.jsonl",
                                                 f"--tests-from={pending}",
                                                 f"--first-seed={low}", f"--seeds={high - low}"),
                                  cwd=REPO, stdout=subprocess.DEVNULL, env=environment)
                 for job, (low, high) in enumerate(zip(bounds, bounds[1:]))]
    for process in processes:
        process.wait()


def log_order(log: Path) -> tuple:
    """seed0*.jsonl first, then shard logs by number: a later log's run of a seed wins."""
    number = re.match(r"shard(\d+)", log.name)
    return (1, int(number[1]), log.name) if number else (0, 0, log.name)


def read_logs(out: Path) -> list[dict]:
    """Every logged test run, once per (test, seed index): a resumed run may repeat a seed."""
    runs = {}
    for log in sorted(out.glob("*.jsonl"), key=log_order):
        for text in log.read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                runs[line["test"], line["seed_index"]] = line
    return list(runs.values())


def worst_ratio(checks: list[dict]) -> tuple[float, str]:
    """The largest error / bound of a test run's checks, and that check's name."""
    ratios = [(check["error"] / check["bound"] if check["bound"] > 0 else (0.0 if check["error"] == 0
                                                                            else float("inf")), check["what"])
              for check in checks]
    return max(ratios, default=(0.0, ""))


def summarize(lines: list[dict]) -> list[dict]:
    """One row per accuracy test: seeds, failures (with their seeds), worst and median ratio."""
    runs = defaultdict(list)
    for line in lines:
        runs[line["test"]].append(line)
    rows = []
    for test, test_runs in sorted(runs.items()):
        ratios = [(worst_ratio(run["checks"]), run["seed"]) for run in test_runs if run["checks"]]
        failures = [run["seed"] for run in test_runs if run["outcome"] == "failed"]
        if not ratios and not failures:
            continue  # not an accuracy test
        (worst, what), worst_seed = max(ratios, key=lambda item: item[0][0], default=((float("nan"), ""), None))
        rows.append(dict(test=test, seeds=len(test_runs), failures=failures, worst=worst, worst_check=what,
                         worst_seed=worst_seed,
                         median=statistics.median(ratio for (ratio, _), _ in ratios) if ratios else float("nan")))
    return rows


def by_file(rows: list[dict]) -> list[dict]:
    files = defaultdict(list)
    for row in rows:
        files[row["test"].split("::")[0]].append(row)
    return [dict(file=name, tests=len(group), seeds=min(row["seeds"] for row in group),
                 failures=sum(len(row["failures"]) for row in group),
                 worst=max(group, key=lambda row: row["worst"]))
            for name, group in sorted(files.items())]


def file_table(rows: list[dict]) -> str:
    lines = ["| test file | accuracy tests | seeds each | failures | worst error / bound | in |",
             "|---|---:|---:|---:|---:|---|"]
    for entry in by_file(rows):
        worst = entry["worst"]
        test = worst["test"].split("::", 1)[1]
        lines.append(f"| `{entry['file']}` | {entry['tests']} | {entry['seeds']} | {entry['failures']} | "
                     f"{worst['worst']:.2f} | `{test}` ({worst['worst_check'] or 'check'}) |")
    return "\n".join(lines)


def test_table(rows: list[dict]) -> str:
    lines = ["| test | seeds | failures | worst error / bound | median | worst check (seed) |",
             "|---|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda row: -row["worst"]):
        failures = f"{len(row['failures'])} ({', '.join(map(str, row['failures'][:3]))})" if row["failures"] else "0"
        lines.append(f"| `{row['test']}` | {row['seeds']} | {failures} | {row['worst']:.3f} | {row['median']:.3f} | "
                     f"{row['worst_check'] or 'check'} ({row['worst_seed']}) |")
    return "\n".join(lines)


def merged(saved: list[dict], rows: list[dict], current: set[str]) -> list[dict]:
    """The saved rows with those of ``rows``' tests replaced (a run of some files updates
    theirs only), and the rows of tests pytest no longer collects dropped."""
    by_test = {row["test"]: row for row in saved if row["test"] in current}
    by_test.update((row["test"], row) for row in rows)
    return [by_test[test] for test in sorted(by_test)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="seed indices 0..N-1 (default 200)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes for seeds 1..N-1 (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / ".stress", help="logs and summary (default .stress/)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the logs in --out and run only the seed indices each test still lacks")
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="only tabulate the logs in DIR")
    parser.add_argument("--save", action="store_true",
                        help="also write the logged tests' rows into tests/stress.{json,md} and the README's "
                             "table (the other tests keep theirs; tests no longer collected are dropped)")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README's table from "
                                                              "tests/stress.json")
    args, selection = parser.parse_known_args()
    if args.readme:
        print("README.md updated" if update_readme(json.loads(SUMMARY.read_text())) else "README.md already current")
        return 0
    out = args.summarize or args.out
    if not args.summarize:
        run(selection, args.seeds, args.jobs, out, args.resume)
    current = collected_tests([])
    rows = summarize([line for line in read_logs(out) if line["test"] in current])
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "summary.md").write_text(test_table(rows) + "\n")
    print(file_table(rows))
    if args.save:
        saved = merged(json.loads(SUMMARY.read_text()) if SUMMARY.exists() else [], rows, current)
        SUMMARY.write_text(json.dumps(saved, indent=1) + "\n")
        TABLE.write_text("# Accuracy bounds over many seeds (tests/stress.py)\n\n" + test_table(saved) + "\n")
        update_readme(saved)
    failures = sum(len(row["failures"]) for row in rows)
    print(f"{len(rows)} accuracy tests, {failures} failed runs; per test: {out / 'summary.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
