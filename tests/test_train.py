"""Reference trainers: smoke runs, kernels on/off agreement, exact resume, gloo DDP, bad configs.

Sizes are tiny (16-px images, one ViT block, ResNet-18 on 16 px) so the file runs in about
two minutes on a CPU; the trainers pick the reference backend there, never the interpreter.
"""

import json
import os

import numpy as np
import pytest
import torch
from accuracy import assert_close
from distributed import run_distributed

from fastssl.cli import main
from fastssl.train import resolve_config, train
from fastssl.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_newest_readable,
    rng_state,
    set_rng_state,
)
from fastssl.train.config import validate
from fastssl.train.data import ShapesDataset, rank_batches
from fastssl.train.knn import weighted_knn_predict
from fastssl.train.method import collapse_statistics
from fastssl.train.monitor import CollapseWatch
from fastssl.train.neco import box_in_crop, box_intersection

TINY = dict(image_size=16, global_crop_size=16, local_crop_size=8, local_crops=2, train_images_per_class=4,
            test_images_per_class=2, batch_size=8, epochs=2, depth=1, out_dim=64, head_hidden_dim=32,
            head_bottleneck_dim=16, workers=0, progress=False, threads=1, knn=False)


def tiny_config(method, tmp_path, **overrides):
    values = dict(TINY, output_dir=str(tmp_path / method))
    if method in ("swav", "barlow", "simclr"):
        values.update(arch="resnet18")
    if method in ("barlow", "simclr"):
        values.update(local_crops=0)
    if method == "neco":
        values.update(neco_aligned_side=3, local_crops=1)  # sorting rows of 9 instead of NeCo's 49
    values.update(overrides)
    return resolve_config(method, "tiny", **values)


@pytest.mark.parametrize("method", ["dino", "dinov2", "swav", "barlow", "simclr", "neco"])
def test_each_method_trains_a_few_steps_and_checkpoints(method, tmp_path):
    result = train(tiny_config(method, tmp_path, max_steps=2, knn=method == "dino"))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint["step"] == 2 and set(checkpoint["models"]) >= {"student"}
    records = [json.loads(line) for line in open(tmp_path / method / "log.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["step"] == 1 and "lr" in steps[0] and "images_per_second" in steps[0]
    if method == "dino":
        assert "teacher" in checkpoint["models"] and "center" in checkpoint["per_process"][0]["loss"]
        assert set(result.knn) == {0, 2} and all(0 <= a <= 100 for a in result.knn.values())


@pytest.mark.parametrize("method", ["dino", "dinov2", "barlow", "simclr"])
def test_kernels_off_runs_the_original_ops_to_the_same_losses(method, tmp_path):
    on = train(tiny_config(method, tmp_path / "on", max_steps=2))
    off = train(tiny_config(method, tmp_path / "off", max_steps=2, kernels=False))
    assert_close(torch.tensor(off.losses), torch.tensor(on.losses), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,extra", [
    ("dino", dict(drop_path=0.1)),  # stochastic depth draws from the saved RNG
    ("dinov2", dict(ibot_separate_head=True)),  # asynchronous centers, applied before a checkpoint
    ("dinov2", dict(centering="sinkhorn_knopp")),
    ("swav", dict(swav_queue_length=8, swav_epoch_queue_starts=0, swav_freeze_prototypes_steps=1)),
    ("neco", dict(neco_queue_size=40)),
])
def test_resume_reproduces_the_uninterrupted_losses(method, extra, tmp_path):
    straight = train(tiny_config(method, tmp_path / "straight", max_steps=4, checkpoint_every=2, **extra))
    first_half = train(tiny_config(method, tmp_path / "resumed", max_steps=2, **extra))
    second_half = train(tiny_config(method, tmp_path / "resumed", max_steps=4, **extra))
    assert second_half.first_step == 2
    assert first_half.losses + second_half.losses == straight.losses


# Two DINOv2 terms are per process, as in DINOv2: KoLeo looks for nearest neighbours within a
# process's images, and the iBOT center averages each process's mean masked token (their
# counts differ). The equivalence leaves KoLeo out and takes Sinkhorn-Knopp targets.
PER_PROCESS_TERMS_OFF = {"dinov2": dict(koleo_loss_weight=0.0, centering="sinkhorn_knopp")}


def _train_on_two_processes(rank, world_size, tmp_path, method, fsdp):
    extra = PER_PROCESS_TERMS_OFF.get(method, {})
    straight = train(tiny_config(method, tmp_path / "straight", max_steps=3, fsdp=fsdp, **extra))
    train(tiny_config(method, tmp_path / "resumed", max_steps=2, fsdp=fsdp, **extra))
    resumed = train(tiny_config(method, tmp_path / "resumed", max_steps=3, fsdp=fsdp, **extra))
    torch.save((straight.losses, resumed.losses), tmp_path / f"losses_{rank}.pt")


@pytest.mark.parametrize("method,fsdp", [("dino", False), ("dino", True), ("dinov2", False)],
                         ids=["dino-ddp", "dino-fsdp2", "dinov2-ddp"])
def test_gloo_two_processes_match_one_process_and_resume(method, fsdp, tmp_path):
    run_distributed(_train_on_two_processes, tmp_path, method, fsdp, world_size=2)
    (straight, resumed), other_rank = [torch.load(tmp_path / f"losses_{rank}.pt") for rank in range(2)]
    assert other_rank == (straight, resumed)  # the logged loss is averaged over the processes
    assert resumed == straight[2:]
    single = train(tiny_config(method, tmp_path / "single", max_steps=3, **PER_PROCESS_TERMS_OFF.get(method, {})))
    # The same images (augmentations are seeded per sample), half a batch per process.
    assert_close(torch.tensor(straight), torch.tensor(single.losses), rtol=1e-4, atol=1e-4)
    assert len(load_checkpoint(str(tmp_path / "straight" / method / "checkpoint.pt"))["per_process"]) == 2


def _simclr_on_two_processes(rank, world_size, tmp_path):
    losses = [train(tiny_config("simclr", tmp_path / kernels, max_steps=2, kernels=kernels == "on")).losses
              for kernels in ("on", "off")]
    torch.save(losses, tmp_path / f"losses_{rank}.pt")


def test_gloo_simclr_negatives_span_the_processes(tmp_path):
    """NT-Xent over the global batch: the fused loss gathers the rows of both processes as the
    eager original does (lightly's gather_distributed). On the CPU batch norm stays per
    process, so two processes are compared with kernels on and off, not with one process."""
    run_distributed(_simclr_on_two_processes, tmp_path, world_size=2)
    on, off = torch.load(tmp_path / "losses_0.pt")
    assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-4, atol=1e-4)


def test_image_folder_data(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        os.makedirs(tmp_path / "images" / label)
        for index in range(4):
            color = (index * 60, 255 - index * 60, 128) if label == "a" else (0, index * 60, 255)
            Image.new("RGB", (20, 24), color).save(tmp_path / "images" / label / f"{index}.png")
    result = train(tiny_config("dino", tmp_path, data=str(tmp_path / "images"), max_steps=1, knn=True))
    assert len(result.losses) == 1 and result.knn == {}  # no labeled held-out split for --data


def test_cli_train_and_bad_configs(tmp_path, capsys):
    args = ["train", "dino", "--preset", "tiny", "--output-dir", str(tmp_path / "cli"), "--max-steps", "1",
            "--image-size", "16", "--global-crop-size", "16", "--local-crop-size", "8", "--local-crops", "1",
            "--depth", "1", "--out-dim", "32", "--train-images-per-class", "2", "--batch-size", "4",
            "--workers", "0", "--knn", "off", "--progress", "off", "--kernels", "off",
            "--global-crop-scale", "0.5", "1.0"]
    assert main(args) == 0
    assert "loss" in capsys.readouterr().out

    for bad, message in ((["--arch", "vit_huge"], "unknown ViT arch"), (["--arch", "resnet7"], "unknown arch"),
                         (["--data", str(tmp_path / "missing")], "is not a directory"),
                         (["--optimizer", "adam"], "unknown optimizer")):
        assert main(["train", "dino", *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "moco"])
    with pytest.raises(ValueError, match="simclr uses two crops"):
        resolve_config("simclr", local_crops=2)
    with pytest.raises(ValueError, match="--simclr-temperature must be > 0"):
        resolve_config("simclr", simclr_temperature=0.0)
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        validate(resolve_config("dino", batch_size=2), world_size=4)
    with pytest.raises(ValueError, match="trains a ViT"):
        resolve_config("dino", arch="resnet50")


def test_builtin_dataset_is_deterministic_with_disjoint_splits():
    a, b = ShapesDataset("train", 3, 16, seed=1), ShapesDataset("train", 3, 16, seed=1)
    test = ShapesDataset("test", 3, 16, seed=1)
    assert len(a) == 30 and len(a.classes) == 10 and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, test.images)


def test_data_order_splits_each_global_batch_over_processes():
    shares = [rank_batches(20, 8, rank, 2, seed=0, epoch=1) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2] and all(len(batch) == 4 for s in shares for batch in s)
    seen = [index for s in shares for batch in s for _, index in batch]
    assert len(set(seen)) == 16
    assert rank_batches(20, 8, 0, 2, seed=0, epoch=1, first_step=1) == shares[0][1:]


def test_weighted_knn_and_neco_overlap_geometry():
    features = torch.nn.functional.normalize(torch.eye(3).repeat_interleave(2, 0) + 0.01 * torch.randn(6, 3), dim=1)
    labels = torch.arange(3).repeat_interleave(2)
    assert torch.equal(weighted_knn_predict(features, labels, features[::2], 3, k=2), labels[::2])

    crop = torch.tensor([[10.0, 0.0, 30.0, 20.0]])
    overlap = box_intersection(crop, torch.tensor([[20.0, 5.0, 40.0, 25.0]]))
    assert overlap.tolist() == [[20.0, 5.0, 30.0, 20.0]]
    assert box_in_crop(overlap, crop, torch.tensor([False]), 4).tolist() == [[2.0, 1.0, 4.0, 4.0]]
    assert box_in_crop(overlap, crop, torch.tensor([True]), 4).tolist() == [[0.0, 1.0, 2.0, 4.0]]


def test_checkpoints_are_written_atomically(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 2} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    config = tiny_config("dino", tmp_path, max_steps=2, checkpoint_every=1)
    train(config)
    checkpoint = tmp_path / "dino" / "checkpoint.pt"
    assert load_checkpoint(str(checkpoint))["step"] == 2
    assert load_checkpoint(str(tmp_path / "dino" / "checkpoint.previous.pt"))["step"] == 1
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a copy cut short
    resumed = train(tiny_config("dino", tmp_path, max_steps=3, checkpoint_every=1))
    err = capsys.readouterr().err
    assert resumed.first_step == 1 and f"skipped the damaged checkpoint {checkpoint}" in err
    previous = tmp_path / "dino" / "checkpoint.previous.pt"
    previous.write_bytes(b"not a checkpoint")
    (tmp_path / "dino" / "checkpoint.pt").write_bytes(b"nor this")
    with pytest.raises(ValueError, match="no readable checkpoint to resume from .*--resume off"):
        train(tiny_config("dino", tmp_path, max_steps=4))
    capsys.readouterr()
    assert main(["train", "dino", "--preset", "tiny", "--output-dir", str(tmp_path / "dino"), "--depth", "1",
                 "--knn", "off", "--progress", "off", "--workers", "0", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("fastssl train: error: no readable checkpoint to resume from")
    assert "Traceback" not in err


class RunsCodeWhenUnpickled:
    """What a hostile checkpoint holds: unpickling it calls exec (here: writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_that_would_run_code_is_refused(zip_format, tmp_path, capsys):
    marker, checkpoint = tmp_path / "marker", tmp_path / "dino" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"step": 1, "models": RunsCodeWhenUnpickled(marker)}, checkpoint,
               _use_new_zipfile_serialization=zip_format)
    refusal = f"refusing to load {checkpoint}: unpickling it would call (builtins.)?exec, which can run code"
    with pytest.raises(CheckpointError, match=refusal):
        load_checkpoint(str(checkpoint))
    # Refused, not skipped for an older file: it was not written by the trainer.
    torch.save({"step": 0}, tmp_path / "dino" / "checkpoint.previous.pt")
    with pytest.raises(CheckpointError, match=refusal):
        load_newest_readable(str(checkpoint))
    assert main(["train", "dino", "--preset", "tiny", "--output-dir", str(checkpoint.parent), "--depth", "1",
                 "--knn", "off", "--progress", "off", "--workers", "0", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"fastssl train: error: refusing to load {checkpoint}")
    assert "Traceback" not in err
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # the file is live: a trusting load runs its code
    assert marker.read_text() == "ran"


def test_rng_states_round_trip_through_weights_only_loads(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    np.random.seed(5)
    np.random.normal()  # a cached Gaussian in NumPy's state
    atomic_save({"step": 1, "rng": rng_state()}, path)
    expected = np.random.normal(size=3), torch.rand(3)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []  # loadable by a plain torch.load
    set_rng_state(load_checkpoint(path)["rng"])
    assert (np.random.normal(size=3) == expected[0]).all() and torch.equal(torch.rand(3), expected[1])
    # Checkpoints written before NumPy's key became a tensor hold NumPy's own state tuple: still loaded,
    # with NumPy's array types allowed during that load only.
    np.random.seed(5)
    np.random.normal()
    older = dict(rng_state(), numpy=np.random.get_state())
    atomic_save({"step": 1, "rng": older}, path)
    set_rng_state(load_checkpoint(path)["rng"])
    assert (np.random.normal(size=3) == expected[0]).all()
    assert not any(getattr(entry, "__module__", "").startswith("numpy")
                   for entry in torch.serialization.get_safe_globals())


@pytest.mark.parametrize("option,value,message", [
    ("lr", -1.0, "--lr must be > 0, got -1.0"), ("epochs", 0, "--epochs must be >= 1"),
    ("teacher_temp", 0.0, "--teacher-temp must be > 0"), ("momentum_teacher", 1.5, "--momentum-teacher must be >= 0"),
    ("drop_path", -0.1, "--drop-path must be >= 0 and <= 1"), ("workers", -1, "--workers must be >= 0"),
    ("local_crop_scale", (0.5, 0.1), "--local-crop-scale must be two fractions"),
])
def test_numeric_options_out_of_range_are_one_line_errors(option, value, message, capsys):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_config("dino", "tiny", **{option: value})
    flag = f"--{option.replace('_', '-')}"
    arguments = [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    assert main(["train", "dino", "--preset", "tiny", *arguments]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_collapse_watch_warns_after_a_whole_collapsed_epoch():
    uniform = {"output_entropy": 0.99, "batch_entropy": 0.99}
    one_entry = {"output_entropy": 0.0, "batch_entropy": 0.0}
    healthy = {"output_entropy": 0.2, "batch_entropy": 0.8}
    watch = CollapseWatch(steps_per_epoch=2)
    assert watch.update(0, uniform) is None and watch.update(0, healthy) is None
    assert watch.update(1, uniform) is None and watch.update(1, uniform) is None  # epoch 0 was not collapsed
    assert "epoch 1: the targets were uniform" in watch.update(2, one_entry)
    assert watch.update(2, one_entry) is None and "epoch 2: every image got the same target" in watch.finish()
    distribution = torch.full((4, 8), 1 / 8)
    assert collapse_statistics(distribution) == pytest.approx({"output_entropy": 1.0, "batch_entropy": 1.0})
    assert collapse_statistics(torch.eye(8)[[3, 3, 3]]) == pytest.approx({"output_entropy": 0.0,
                                                                          "batch_entropy": 0.0}, abs=1e-6)


def test_dinov2_bad_configs():
    with pytest.raises(ValueError, match="dinov2 trains a ViT"):
        resolve_config("dinov2", arch="resnet18")
    with pytest.raises(ValueError, match="--centering must be centering or sinkhorn_knopp"):
        resolve_config("dinov2", "tiny", centering="mean")
    with pytest.raises(ValueError, match="--mask-ratio must be two fractions"):
        resolve_config("dinov2", "tiny", mask_ratio=(0.6, 0.2))
