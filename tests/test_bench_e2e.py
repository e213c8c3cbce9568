"""The end-to-end benchmark: a CPU smoke run through the CLI and the script, the GPU-hour
arithmetic, the results table, the attribution of profiled time, bad input; on a GPU, a real
recipe at a few steps. No test asserts a timing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from fastssl.cli import main
from fastssl.profiling import LOSS, SORTING, component_times_us, event_components
from fastssl.train.bench_e2e import RECIPES, Schedule, gpu_hours, markdown_table, recipe_config

REPO = Path(__file__).resolve().parent.parent
PATHS = ("reference", "fastssl")
BREAKDOWN = {"attention", "loss", "sorting", "rest"}


def test_smoke_run_of_a_recipe_through_the_cli_writes_json_table_and_chart(tmp_path, capsys):
    assert main(["bench", "e2e", "--recipe", "neco-vits14", "--smoke", "--steps", "1", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    assert "neco-vits14: reference" in capsys.readouterr().out
    out = tmp_path / "smoke-cpu"
    document = json.loads((out / "e2e.json").read_text())
    assert document["benchmark"] == "e2e" and document["smoke"] is True and document["assumptions"]
    assert document["steps"] == 1 and document["warmup"] == 1
    (result,) = document["recipes"]
    assert result["recipe"] == "neco-vits14" and result["goal"] == RECIPES["neco-vits14"].goal
    assert result["config"]["threads"] == 1
    for path in PATHS:
        measured = result[path]
        assert len(measured["step_ms_samples"]) == 1 and measured["step_ms"] > 0
        assert measured["peak_memory_bytes"] is None  # CPU
        assert set(measured["breakdown_ms"]) == BREAKDOWN and min(measured["breakdown_ms"].values()) >= 0
        assert measured["breakdown_ms"]["sorting"] > 0  # both paths sort inside NeCo's loss
    assert result["speedup"] == pytest.approx(result["reference"]["step_ms"] / result["fastssl"]["step_ms"])
    assert result["schedule"]["steps"] == 25 * (118_287 // 64)
    assert result["gpu_hours"]["published_scaled"]["reference"] == 19
    table = (out / "e2e.md").read_text()
    assert "GPU numbers are still to be taken" in table and "| neco-vits14 | reference |" in table
    assert (out / "e2e.png").stat().st_size > 0


def test_the_benchmark_script_takes_run_all_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--smoke", "--no-compile", "--recipe",
         "dino-vits16", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "smoke-cpu" / "e2e.json").read_text())["recipes"][0]["recipe"] == "dino-vits16"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_trainer_config(name):
    config = recipe_config(RECIPES[name], smoke=False)
    assert config.method == RECIPES[name].method
    if name == "dinov2-vitl14":
        assert config.vit_spec() == (1024, 16, 14, 0) and config.depth == 24  # ViT-L/14


def test_gpu_hours_from_the_step_time_and_from_the_published_figure():
    schedule = Schedule("100 epochs", 336, gpus=8, global_batch=512, epochs=100, images=1_281_167)
    assert schedule.steps == 100 * 2502
    hours = gpu_hours(schedule, reference_ms=620.0, fastssl_ms=310.0)
    assert hours["steps"] == 250_200
    assert hours["from_step_time"] == pytest.approx(
        {"reference": 250_200 * 8 * 0.62 / 3600, "fastssl": 250_200 * 8 * 0.31 / 3600,
         "saved": 250_200 * 8 * 0.31 / 3600})
    assert hours["published_scaled"] == pytest.approx({"reference": 336, "fastssl": 168, "saved": 168})
    incomplete = gpu_hours(Schedule("500 epochs", 7600, epochs=500), reference_ms=100.0, fastssl_ms=80.0)
    assert incomplete["steps"] is None and incomplete["from_step_time"] is None
    assert incomplete["published_scaled"] == pytest.approx({"reference": 7600, "fastssl": 6080, "saved": 1520})


def _measured(step_ms, peak):
    return {"step_ms": step_ms, "step_ms_samples": [step_ms], "peak_memory_bytes": peak,
            "breakdown_ms": {"attention": 1.0, "loss": 2.0, "sorting": 0.0, "rest": step_ms - 3.0}}


def test_markdown_table_has_speedup_goal_memory_hours_and_breakdown():
    recipe = RECIPES["dino-vits16"]
    result = {"recipe": "dino-vits16", "title": recipe.title, "note": recipe.note,
              "reference": _measured(160.0, 2**31), "fastssl": _measured(100.0, 2**30),
              "speedup": 1.6, "goal": recipe.goal, "goal_met": True,
              "schedule": {"description": recipe.schedule.description, "note": recipe.schedule.note},
              "gpu_hours": gpu_hours(recipe.schedule, 160.0, 100.0)}
    meta = {"device": "H100", "torch": "2", "triton": "3", "commit": "abc", "date": "today"}
    table = markdown_table(meta, {"smoke": False, "steps": 20, "warmup": 5, "recipes": [result]})
    assert table.startswith("# e2e training step on H100\n") and "still to be taken" not in table
    row = next(line for line in table.splitlines() if line.startswith("| dino-vits16 | 160.0 |"))
    assert f"| 1.60x | {recipe.goal:.2f}x | yes |" in row and "2.0 GiB / 1.0 GiB" in row
    assert "336.0 / 210.0 / 126.0" in row  # published GPU-hours scaled by 100/160
    assert "| dino-vits16 | fastssl | 1.0 | 2.0 | 0.0 | 97.0 |" in table


def test_profiled_time_goes_to_the_forward_ranges_backward_included():
    x, w = torch.randn(16, 32), torch.randn(32, 32, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = torch.sigmoid(x @ w)
        attended = F.scaled_dot_product_attention(hidden[None], hidden[None], hidden[None])[0]
        with record_function(LOSS):
            with record_function(SORTING):  # the innermost range wins
                ordered = torch.cumsum(attended, dim=-1)
            loss = ordered.square().mean()
        loss.backward()
    backward = {event.name.split(": ")[-1]: component for event, component in event_components(prof.events())
                if event.name.startswith("autograd::engine::evaluate_function:")}
    assert backward["SigmoidBackward0"] is None and backward["MmBackward0"] is None
    assert next(c for name, c in backward.items() if "ScaledDotProduct" in name) == "attention"
    assert backward["CumsumBackward0"] == "sorting"
    assert backward["PowBackward0"] == "loss" and backward["MeanBackward0"] == "loss"
    assert all(value > 0 for value in component_times_us(prof.events(), device_time=False).values())


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "dino-vitg14"], "invalid choice: 'dino-vitg14'"),
    (["--steps", "0"], "expected an integer >= 1, got 0"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "e2e", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_flag_skips_the_suite(capsys):
    assert main(["bench", "e2e", "--cpu"]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.gpu
def test_a_real_recipe_on_the_gpu(tmp_path):
    assert main(["bench", "e2e", "--recipe", "dino-vits16", "--steps", "3", "--warmup", "2",
                 "--out", str(tmp_path)]) == 0
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    (result,) = json.loads((folder / "e2e.json").read_text())["recipes"]
    for path in PATHS:
        measured = result[path]
        assert measured["peak_memory_bytes"] > 0
        assert measured["breakdown_ms"]["attention"] > 0 and measured["breakdown_ms"]["loss"] > 0
    assert result["gpu_hours"]["from_step_time"]["reference"] > 0
    assert (folder / "e2e.md").exists() and (folder / "e2e.png").exists()
