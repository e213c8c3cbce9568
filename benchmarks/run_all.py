"""Run every benchmark script (the ops' and the end-to-end suite), then regenerate the
README's results section from benchmarks/results/<device>/*.md.

    python benchmarks/run_all.py            # on a CUDA GPU: writes results, updates README.md
    python benchmarks/run_all.py --smoke    # tiny sizes on the CPU; README.md is left alone
    python benchmarks/run_all.py --readme   # only regenerate README.md from stored results

Each script runs in its own process (one failing script does not stop the others; the
exit status says whether any failed). Extra arguments go to every script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fastssl.benchmark import replace_marked_section

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NO_RESULTS = "No GPU numbers have been taken yet."
SHOWN_ELSEWHERE = {"train_quality.md", "micro_batch.md", "plan.md"}  # tables in the README's trainer section


def scripts() -> list[Path]:
    return sorted(BENCHMARKS.glob("bench_*.py"))


def run_scripts(extra: list[str]) -> list[str]:
    """Names of the scripts that failed."""
    failed = []
    env = dict(os.environ)
    if "--smoke" in extra:
        env.setdefault("TRITON_INTERPRET", "1")
    for script in scripts():
        print(f"== {script.name} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, str(script), *extra], cwd=REPO, env=env).returncode != 0:
            failed.append(script.name)
    return failed


def results_markdown() -> str:
    """Every stored table, one subsection per device and op, or a sentence when none exist."""
    sections = []
    for device in sorted(path for path in RESULTS.glob("*") if path.is_dir() and path.name != "smoke-cpu"):
        for table in sorted(path for path in device.glob("*.md") if path.name not in SHOWN_ELSEWHERE):
            body = table.read_text().strip().splitlines()
            title = body[0].lstrip("# ") if body and body[0].startswith("#") else table.stem
            sections.append("\n".join([f"#### {title}", *body[1:]]))
    return "\n\n".join(sections) if sections else NO_RESULTS


def update_readme() -> bool:
    return replace_marked_section(REPO / "README.md", BEGIN, END, results_markdown())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="only regenerate README.md from stored results")
    args, extra = parser.parse_known_args()
    failed = [] if args.readme else run_scripts(extra)
    if "--smoke" not in extra:
        print("README.md updated" if update_readme() else "README.md already current")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
