"""benchmarks/gpu_session.py: the budget logic on stand-in steps, the dry run's plan, and the
whole sequence in smoke mode on the CPU."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from fastssl.cli import main as cli_main
from fastssl.train.bench_e2e import RECIPES

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.py"


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = sys.modules["gpu_session"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steps_run_in_order_within_the_budget_and_every_outcome_is_recorded(session, tmp_path):
    ran = []

    def step(phase, name, estimate, outcome="ok"):
        def run():
            ran.append(name)
            if outcome == "fail":
                raise RuntimeError("this contender cannot run")
            return {"value": name}
        return session.Step(phase, name, estimate, run)

    steps = [step(0, "first", 1), step(2, "too long", 1000), step(2, "fails", 1, "fail"), step(4, "last", 1),
             step(4, "done before", 1)]
    records = session.run_session(steps, budget_s=60, out=tmp_path, skip={"done before"})
    assert ran == ["first", "fails", "last"]
    assert [r["status"] for r in records] == ["done", "skipped", "failed", "done", "skipped"]
    assert "estimate 1000 s" in records[1]["reason"] and "RuntimeError" in records[2]["error"]
    assert records[4]["reason"] == "done in the resumed session"
    assert read_records(tmp_path / "results.jsonl") == json.loads(json.dumps(records))  # appended as they ran


def test_the_correctness_phase_stops_at_its_cap(session, tmp_path, monkeypatch):
    monkeypatch.setattr(session, "CORRECTNESS_CAP_S", 0.75)  # measured time spent plus the next estimate
    steps = [session.Step(1, f"check {i}", 0.3, lambda: time.sleep(0.3) or {}) for i in range(4)]
    records = session.run_session(steps, budget_s=60, out=tmp_path, skip=set())
    assert [r["status"] for r in records] == ["done", "done", "skipped", "skipped"]
    assert "the correctness phase's 1 s are spent" in records[2]["reason"]


def test_dry_run_plan_fits_the_budget(session, capsys):
    assert cli_main(["bench", "gpu-session", "--dry-run", "--budget-s", "480"]) == 0
    out = capsys.readouterr().out
    for phase in range(4):
        assert f"phase {phase}:" in out
    assert "within the 480 s budget" in out
    assert session.dry_run(session.plan_for_dry_run(), budget_s=100) == 1  # and says when it does not fit


def test_smoke_session_runs_every_phase_and_writes_three_files(session, tmp_path):
    assert session.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.jsonl", "summary.md", "summary.png"]
    records = read_records(tmp_path / "results.jsonl")
    assert {record["phase"] for record in records} == {0, 1, 2, 3, 4}
    assert all(record["status"] == "done" for record in records), [r for r in records if r["status"] != "done"]
    assert all(record["result"]["passed"] for record in records if record["phase"] == 1)
    summary = (tmp_path / "summary.md").read_text()
    assert "| case | goal | measured | met |" in summary
    assert f"| e2e dino-vits16 | {RECIPES['dino-vits16'].goal:g}x faster training step |" in summary
