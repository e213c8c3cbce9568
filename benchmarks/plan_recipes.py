"""The recipes' memory and work at their real sizes, predicted without a GPU (``fastssl plan``):
peak memory with the original ops and with fastssl's, the largest batch per GPU on a 24 GB
RTX 4090, a 40 GB A100 and an 80 GB H100, the micro-batch that reaches the recipe's global
batch on one RTX 4090, and the bound the step's composition puts on fastssl's end-to-end
speed-up (Amdahl: the step's time if attention and the loss, the parts fastssl replaces,
cost nothing). Model figures, labelled so: GPU measurements replace them when taken.

    python benchmarks/plan_recipes.py            # every recipe; writes results/model/plan.*, the README table
    python benchmarks/plan_recipes.py --recipes dino-vits16 --out DIR
    python benchmarks/plan_recipes.py --readme   # only the README's table, from results/model/plan.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

from fastssl.benchmark import current_commit, readme_table_from, replace_marked_section
from fastssl.plan import GB, THROUGHPUT, StepModel, autocast_dtype, sample_metadata, step_report, usable_bytes
from fastssl.train.bench_e2e import RECIPES as E2E_RECIPES
from fastssl.train.bench_e2e import recipe_config
from fastssl.train.config import resolve_config

RESULTS = Path(__file__).resolve().parent / "results" / "model"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- plan:begin -->", "<!-- plan:end -->"
GPUS = (("rtx4090", 24.0), ("a100", 40.0), ("h100", 80.0))  # (device, memory GB)
SMALL_GPU = "rtx4090"
TIMING_GPU = "h100"  # whose rates the time shares and bounds use


@dataclasses.dataclass(frozen=True)
class PlanRecipe:
    title: str
    config: object  # TrainConfig at the recipe's per-GPU shapes
    global_batch: Optional[int]


def recipes() -> dict[str, PlanRecipe]:
    """bench_e2e's recipes (DINO with its 10 local crops) and SimCLR's ResNet-50 at batch 4096
    (8 GPUs x 512); global batches from REFERENCE.md where it gives them."""
    table = {}
    for name, recipe in E2E_RECIPES.items():
        config = recipe_config(recipe, smoke=False)
        title = recipe.title
        if name == "dino-vits16":
            config = dataclasses.replace(config, local_crops=10)
            title = title.replace("8x96", "10x96")
        table[name] = PlanRecipe(title, config, recipe.schedule.global_batch)
    table["simclr-rn50"] = PlanRecipe(
        "SimCLR ResNet-50, 512 x 2x224, NT-Xent over 1024 rows",
        resolve_config("simclr", arch="resnet50", global_crop_size=224, batch_size=512), 4096)
    return table


def plan_recipe(recipe: PlanRecipe) -> dict:
    config = recipe.config
    dtype = autocast_dtype(SMALL_GPU)  # bfloat16 on all three GPUs
    sample = sample_metadata(config)
    row = {"title": recipe.title, "method": config.method, "batch_per_gpu": config.batch_size,
           "global_batch": recipe.global_batch}
    paths = [("kernels_off", config, False), ("kernels_on", config, True)]
    if config.is_vit:  # the packed ViT's saved activations are most of the peak: with blocks recomputed
        paths.append(("kernels_on_checkpointed", dataclasses.replace(config, checkpoint_blocks=True), True))
    for path, path_config, kernels in paths:
        model = StepModel(path_config, kernels, dtype, sample, TIMING_GPU)
        step = model.step(config.batch_size)
        row[path] = {
            **step_report(step, THROUGHPUT[TIMING_GPU]),
            "max_batch_per_gpu": {gpu: model.max_batch(usable_bytes(memory)) for gpu, memory in GPUS},
        }
        if path == "kernels_on" and recipe.global_batch is not None:
            capacity = usable_bytes(dict(GPUS)[SMALL_GPU])
            row[path]["micro_batch_for_global_batch"] = model.micro_batch_for(capacity, recipe.global_batch)
        print(f"  {path}: peak {step.peak_bytes / GB:.2f} GB, max batch {row[path]['max_batch_per_gpu']}", flush=True)
    off = row["kernels_off"]["components"]
    owned = off["attention"]["share"] + off["loss"]["share"]
    row["fastssl_share"] = owned
    row["speedup_bound"] = 1.0 / (1.0 - owned)
    on_ms = sum(part["model_ms"] for part in row["kernels_on"]["components"].values())
    row["modeled_speedup"] = sum(part["model_ms"] for part in off.values()) / on_ms
    return row


def _batches(part: dict) -> str:
    return " / ".join(str(part["max_batch_per_gpu"][gpu]) for gpu, _ in GPUS)


def table(document: dict) -> str:
    gpus = " / ".join(f"{gpu} {memory:g} GB" for gpu, memory in GPUS)
    lines = [
        "**Model figures, not measurements**: one whole training step (forward, backward, optimizer, EMA) run "
        f"on PyTorch's meta device by `fastssl plan` (bf16 autocast as CUDA applies it; attention as the GPU's "
        f"fused kernels), commit {document['commit']}. Peak: parameters, optimizer state, batch and every "
        "tensor the step creates; a GPU fits a batch when the peak is within 90% of its memory after 1 GB "
        f"of CUDA context. Largest batch per GPU on {gpus}. Time shares: each op at its roofline on an "
        f"{TIMING_GPU.upper()}; the bound is the step's speed-up if attention and the loss (what fastssl "
        "replaces) cost nothing.", "",
        "| recipe | peak, original ops | peak, fastssl | peak, fastssl + `--checkpoint-blocks` | largest batch "
        "per GPU, original | fastssl | fastssl + checkpointing | the recipe's global batch on one RTX 4090 "
        "with fastssl: micro-batch | attention + loss share | speed-up bound | modeled speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in document["recipes"].values():
        checkpointed = row.get("kernels_on_checkpointed")
        micro = "-" if row["global_batch"] is None else \
            f"{row['global_batch']}: {row['kernels_on']['micro_batch_for_global_batch'] or 'none fits'}"
        lines.append(
            f"| {row['title']} | {row['kernels_off']['peak_bytes'] / GB:.1f} GB | "
            f"{row['kernels_on']['peak_bytes'] / GB:.1f} GB | "
            f"{'-' if checkpointed is None else format(checkpointed['peak_bytes'] / GB, '.1f') + ' GB'} | "
            f"{_batches(row['kernels_off'])} | {_batches(row['kernels_on'])} | "
            f"{'-' if checkpointed is None else _batches(checkpointed)} | {micro} | {row['fastssl_share']:.0%} | "
            f"{row['speedup_bound']:.2f}x | {row['modeled_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    """Peak GB per recipe: original ops, fastssl, fastssl with checkpointed blocks; the GPUs'
    usable memory as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(document["recipes"].items())
    paths = (("kernels_off", "original ops", "#999999"), ("kernels_on", "fastssl", "#1f77b4"),
             ("kernels_on_checkpointed", "fastssl + --checkpoint-blocks", "#2ca02c"))
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for index, (key, label, color) in enumerate(paths):
        values = [row[key]["peak_bytes"] / GB if key in row else 0.0 for _, row in rows]
        axis.bar([i + (index - 1) * width for i in range(len(rows))], values, width, label=label, color=color)
    for gpu, memory in GPUS:
        axis.axhline(usable_bytes(memory) / GB, color="black", linewidth=0.8, linestyle=":")
        axis.text(len(rows) - 0.5, usable_bytes(memory) / GB, f" {gpu} {memory:g} GB", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    axis.set_ylabel("peak GB per GPU (model)")
    axis.set_title("One training step at the recipes' per-GPU batch (model, meta device)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", help="a subset (default: all)")
    parser.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS}; README updated only there)")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README's table from "
                                                              "results/model/plan.json")
    args = parser.parse_args(argv)
    if args.readme:
        return readme_table_from(RESULTS / "plan.json", BEGIN, END, table)
    chosen = recipes()
    unknown = set(args.recipes or ()) - set(chosen)
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; known: {', '.join(chosen)}")
    document = {"model": "predicted on the meta device; no GPU ran it", "commit": current_commit(),
                "gpus": dict(GPUS), "timing_gpu": TIMING_GPU, "recipes": {}}
    for name in args.recipes or chosen:
        start = time.perf_counter()
        print(f"{name}:", flush=True)
        document["recipes"][name] = plan_recipe(chosen[name])
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / "plan.md").write_text(f"# Memory and work at the recipes' sizes (model)\n\n{table(document)}\n")
    plot(document, out / "plan.png")
    if args.out is None:
        replace_marked_section(README, BEGIN, END, table(document))
    print(f"wrote {out / 'plan'}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
