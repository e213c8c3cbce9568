import argparse
import json

import torch

from fastssl.benchmark import Case, Contender, run_benchmark


def test_results_are_written_as_json_markdown_and_plot(tmp_path):
    x = torch.randn(1000)

    def failing():
        raise RuntimeError("backend missing")

    def cases(device, smoke, args):
        return [Case("copy 1000", [Contender("clone", x.clone), Contender("broken", failing)], min_bytes=8000)]

    args = argparse.Namespace(smoke=True, out=tmp_path, no_compile=True)
    out = run_benchmark("toy", args, cases)
    document = json.loads((out / "toy.json").read_text())
    assert document["op"] == "toy" and document["smoke"] is True
    assert {"device", "torch", "triton", "commit", "date", "ceilings"} <= set(document)
    clone, broken = document["cases"][0]["results"]
    assert clone["median_ms"] > 0 and clone["gbps"] > 0
    assert broken["error"] == "RuntimeError: backend missing"
    table = (out / "toy.md").read_text()
    assert "| copy 1000 | clone |" in table and "failed: RuntimeError" in table
    assert (out / "toy.png").stat().st_size > 0
