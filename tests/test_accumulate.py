"""Micro-batches with the whole batch's loss (fastssl.accumulate, ``--micro-batch``): the
gradient of a step, training runs and two-process DDP equal the whole batch's; the library
API on its own; peak memory falls with the micro-batch.

The ViT methods' networks treat images independently, so a step in micro-batches equals the
whole batch's. The ResNet methods' batch normalization normalizes over each micro-batch's
rows, so there the reference is the whole batch's loss on outputs computed micro-batch by
micro-batch with autograd (what ranks of that many rows compute under DDP without
SyncBatchNorm; the DDP test below checks exactly that)."""

import contextlib
import copy

import pytest
import torch
from accuracy import assert_accurate, assert_close, output_rounding, worst
from distributed import run_distributed
from test_train import PER_PROCESS_TERMS_OFF, tiny_config

from fastssl.accumulate import cached_gradient_step, concat_crop_major, split_batch, without_gradient
from fastssl.memory import peak_allocated_bytes
from fastssl.train import resolve_config, train
from fastssl.train.checkpoint import load_checkpoint
from fastssl.train.data import SeededViews, ShapesDataset
from fastssl.train.loop import StepPrecision, _micro_batch_backward
from fastssl.train.method import build_method

VIT_METHODS = ("dino", "dinov2", "neco")
BATCH_NORM_METHODS = ("swav", "barlow", "simclr")
# Randomness off (stochastic depth draws per call, so a micro-batch's masks are not the
# whole batch's rows of them); the SwAV queue on from the first step, so its update is tested.
EXACT = dict(drop_path=0.0, swav_queue_length=8, swav_epoch_queue_starts=0)


def first_batch(method, config):
    dataset = ShapesDataset("train", config.train_images_per_class, config.image_size, config.seed)
    views = SeededViews(dataset, method.augmentation(), config.seed)
    return method.collate([views[(0, index)] for index in range(config.batch_size)])


def in_float64(method, batch):
    method = copy.deepcopy(method)
    for module in [*method.modules().values(), getattr(method, "loss_without_queue", None)]:
        if module is not None:
            module.double()

    def cast(item):
        if torch.is_tensor(item):
            return item.double() if item.is_floating_point() else item
        return type(item)(cast(i) for i in item)

    return method, cast(batch)


def gradient(method) -> torch.Tensor:
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten()
                      for p in method.student.parameters()])


def whole_batch_gradient(method, batch, micro_batch_size=None):
    """The gradient of the whole batch's loss with autograd through every micro-batch's
    forward at once (one forward for the whole batch without ``micro_batch_size``)."""
    method = copy.deepcopy(method)
    if micro_batch_size is None:
        loss = method.loss(method.student, batch, 0, 0)
    else:
        micro_batches = method.split(batch, micro_batch_size)

        def join(parts):
            return method.join(parts, micro_batches)

        teacher = None if method.teacher is None else join([method.teacher_outputs(m) for m in micro_batches])
        loss = method.loss_from(join([method.student_outputs(method.student, m) for m in micro_batches]), teacher,
                                batch, 0, 0)
    loss.backward()
    return loss.detach(), gradient(method), method


def micro_batch_gradient(method, batch, micro_batch_size):
    method = copy.deepcopy(method)
    method.config = copy.copy(method.config)
    method.config.micro_batch = micro_batch_size
    loss = _micro_batch_backward(method, method.student, batch, 0, 0, StepPrecision(contextlib.nullcontext()))
    return loss, gradient(method), method


@pytest.mark.parametrize("method_name", VIT_METHODS + BATCH_NORM_METHODS)
def test_a_step_in_micro_batches_has_the_whole_batch_gradient(method_name, tmp_path):
    config = tiny_config(method_name, tmp_path, **EXACT)
    method = build_method(config, True)
    batch = first_batch(method, config)
    reference_micro_batch = 2 if method_name in BATCH_NORM_METHODS else None
    exact_loss, exact, _ = whole_batch_gradient(*in_float64(method, batch), reference_micro_batch)
    # float32 yardsticks: the reference, and for the ViTs also the whole batch's loss on
    # outputs computed micro-batch by micro-batch with autograd (the same function,
    # rounded in other matrix shapes), the worse of the two (tests/accuracy.py).
    baselines = [whole_batch_gradient(method, batch, size)[:2] for size in {reference_micro_batch, 2}]
    loss, actual, _ = micro_batch_gradient(method, batch, 2)
    assert_accurate(actual, worst([gradient for _, gradient in baselines], exact), exact,
                    atol=1e-6 * exact.abs().max().item(), what=f"{method_name} gradient")
    assert_accurate(loss.reshape(1), worst([value.reshape(1) for value, _ in baselines], exact_loss.reshape(1)),
                    exact_loss.reshape(1), atol=output_rounding(exact_loss, torch.float32),
                    what=f"{method_name} loss")


def test_batch_norm_methods_differ_from_the_whole_batch_as_smaller_ranks_do(tmp_path):
    """The reference of the ResNet methods is not the whole batch's forward: their batch
    normalization statistics are the micro-batch's (the test above would pass vacuously if
    the two agreed)."""
    config = tiny_config("simclr", tmp_path, **EXACT)
    method = build_method(config, True)
    batch = first_batch(method, config)
    assert not torch.allclose(whole_batch_gradient(method, batch)[1], micro_batch_gradient(method, batch, 2)[1])


def test_micro_batches_replay_stochastic_depth_and_advance_batch_norm_statistics_once(tmp_path):
    """With stochastic depth on, each micro-batch's second forward draws the masks of its first
    (otherwise the gradient would not be the loss's), and batch normalization's running
    statistics advance once per micro-batch: as the forwards of the reference do."""
    config = tiny_config("swav", tmp_path, **dict(EXACT, arch="vit_tiny_patch8", depth=2, drop_path=0.5))
    method = build_method(config, True)
    batch = first_batch(method, config)
    runs = {}
    for name, seed, run in [("reference", 3, whole_batch_gradient), ("cached", 3, micro_batch_gradient),
                            ("other masks", 4, micro_batch_gradient)]:
        torch.manual_seed(seed)
        runs[name] = run(method, batch, 2)
    (_, expected, reference), (_, actual, cached) = runs["reference"], runs["cached"]
    assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert not torch.allclose(runs["other masks"][1], expected)  # the masks matter
    for after, expected_after, before in zip(cached.student.buffers(), reference.student.buffers(),
                                             method.student.buffers()):
        assert_close(after, expected_after)
    assert any(not torch.equal(after, before) for after, before in zip(cached.student.buffers(),
                                                                         method.student.buffers()))


@pytest.mark.parametrize("method_name", VIT_METHODS)
def test_training_in_micro_batches_gives_the_whole_batch_parameters_and_losses(method_name, tmp_path):
    whole = train(tiny_config(method_name, tmp_path / "whole", max_steps=3, **EXACT))
    micro = train(tiny_config(method_name, tmp_path / "micro", max_steps=3, micro_batch=2, **EXACT))
    assert_close(torch.tensor(micro.losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6, what="losses")
    parameters = [load_checkpoint(run.checkpoint)["models"]["student"] for run in (whole, micro)]
    for name, value in parameters[0].items():
        assert_close(parameters[1][name], value, rtol=1e-4, atol=1e-5, what=name)


@pytest.mark.parametrize("method_name", ["dinov2", "simclr"])
def test_a_tiny_preset_trains_in_micro_batches(method_name, tmp_path):
    """The presets of the README's main command, as the command line sets them up."""
    def run(name, **options):
        return train(resolve_config(method_name, "tiny", max_steps=2, workers=0, progress=False, knn=False,
                                    output_dir=str(tmp_path / name), **options))

    micro = run("micro", micro_batch=8)
    assert len(micro.losses) == 2 and all(torch.isfinite(torch.tensor(micro.losses)))
    if method_name == "dinov2":  # a ViT without stochastic depth in the preset: the whole batch's losses
        assert_close(torch.tensor(micro.losses), torch.tensor(run("whole").losses), rtol=1e-5, atol=1e-6)


def across_processes(method_name: str) -> dict:
    """EXACT, and for DINOv2 without its per-process terms (tests/test_train.py)."""
    return dict(EXACT, **PER_PROCESS_TERMS_OFF.get(method_name, {}))


def _micro_batches_on_two_processes(rank, world_size, tmp_path, method_name, micro_batch, options):
    result = train(tiny_config(method_name, tmp_path / "ranks", max_steps=3, micro_batch=micro_batch, **options))
    torch.save(result.losses, tmp_path / f"losses_{rank}.pt")


@pytest.mark.parametrize("method_name,rank_micro_batch,single_micro_batch,kernels,fsdp", [
    ("dino", 2, None, True, False), ("dinov2", 2, None, True, False),  # 2 ranks x 2 micro-batches = the whole
    ("dino", 2, None, True, True),  # batch at once; under FSDP2 too (gradients reduced after the last)
    ("simclr", None, 4, True, False), ("swav", None, 4, True, False),  # 2 ranks of 4 = micro-batches of 4
    ("barlow", None, 4, False, False),  # the original loss: the fused one has no multi-process CPU backend
])
def test_two_processes_in_micro_batches_equal_one_process(method_name, rank_micro_batch, single_micro_batch,
                                                          kernels, fsdp, tmp_path):
    options = dict(across_processes(method_name), kernels=kernels, fsdp=fsdp)
    run_distributed(_micro_batches_on_two_processes, tmp_path, method_name, rank_micro_batch, options,
                    world_size=2)
    ranks = torch.load(tmp_path / "losses_0.pt")
    assert torch.load(tmp_path / "losses_1.pt") == ranks
    single = train(tiny_config(method_name, tmp_path / "single", max_steps=3, micro_batch=single_micro_batch,
                               **options))
    assert_close(torch.tensor(ranks), torch.tensor(single.losses), rtol=1e-4, atol=1e-4)
    parameters = [load_checkpoint(str(path / method_name / "checkpoint.pt"))["models"]["student"]
                  for path in (tmp_path / "ranks", tmp_path / "single")]
    for name, value in parameters[1].items():
        # Batch normalization's running statistics (evaluation only) are not the same: DDP
        # keeps rank 0's, the single process advances them once per micro-batch.
        if "running_" not in name and "num_batches_tracked" not in name:
            assert_close(parameters[0][name], value, rtol=1e-4, atol=1e-5, what=name)


@pytest.mark.parametrize("method_name", VIT_METHODS + BATCH_NORM_METHODS)
def test_peak_memory_falls_with_the_micro_batch(method_name, tmp_path):
    """Every tensor of a step counted (fastssl.memory.AllocationTracker): the activations held
    at once are one micro-batch's, so the peak grows by the same amount each time the
    micro-batch grows by the same number of images (gradients and the cached outputs, N x D,
    stay), and at 4 of 64 images it is below the whole batch's."""
    config = tiny_config(method_name, tmp_path, batch_size=64, train_images_per_class=64,
                         **{**EXACT, "swav_queue_length": 64})  # a queue holds at least one batch
    method = build_method(config, True)
    batch = first_batch(method, config)

    def peak(micro_batch_size):
        step = copy.deepcopy(method)
        step.config = copy.copy(config)
        step.config.micro_batch = micro_batch_size
        if micro_batch_size is None:
            return peak_allocated_bytes(lambda: step.loss(step.student, batch, 0, 0).backward())
        precision = StepPrecision(contextlib.nullcontext())
        return peak_allocated_bytes(lambda: _micro_batch_backward(step, step.student, batch, 0, 0, precision))

    whole, four, eight, sixteen = peak(None), peak(4), peak(8), peak(16)
    assert four < eight < sixteen
    growth = (sixteen - eight) / (eight - four)  # 8 more images, then 4 more
    assert 1.6 < growth < 2.4, f"{method_name}: peaks {four}, {eight}, {sixteen} bytes are not linear in M"
    assert four < whole, f"{method_name}: micro-batches of 4 peak at {four} bytes, the whole batch at {whole}"


# ------------------------------------------------------------------ the library API on its own


def test_cached_gradient_step_equals_the_whole_batch_for_a_contrastive_loss():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                  torch.nn.Linear(32, 8))
    views = torch.randn(2, 10, 12).unbind()

    def encode(micro):
        return torch.nn.functional.normalize(encoder(torch.cat(micro)), dim=1).chunk(2)

    def loss_fn(z):
        logits = z[0] @ z[1].T / 0.1
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))

    torch.manual_seed(1)
    micro_batches = split_batch(views, 5)
    loss = cached_gradient_step(encode, loss_fn, micro_batches, module=encoder)
    cached = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    torch.manual_seed(1)  # the same dropout masks: drawn micro-batch by micro-batch
    parts = [encode(micro) for micro in micro_batches]
    whole = loss_fn(tuple(torch.cat(outputs) for outputs in zip(*parts)))
    whole.backward()
    assert_close(loss, whole.detach())
    for value, expected in zip(cached, (p.grad for p in encoder.parameters())):
        assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_split_and_join_keep_the_whole_batch_layout():
    crops = [torch.arange(6).float().reshape(6, 1) + 10 * crop for crop in range(3)]
    micro_batches = split_batch(crops, 2)
    assert [m[1].flatten().tolist() for m in micro_batches] == [[10, 11], [12, 13], [14, 15]]
    crop_major = [torch.cat(micro) for micro in micro_batches]  # (3 * 2, 1) each
    assert torch.equal(concat_crop_major(crop_major, [2, 2, 2]), torch.cat(crops))
    assert torch.equal(without_gradient(lambda m: m[0] * 2, micro_batches), crops[0] * 2)


def test_bad_micro_batches_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not split into micro-batches of 3; choose a divisor of 8"):
        split_batch(torch.zeros(8, 2), 3)
    with pytest.raises(ValueError, match="different numbers of rows"):
        split_batch((torch.zeros(8), torch.zeros(4)), 2)
    with pytest.raises(ValueError, match="--micro-batch 3 must divide the 8 images"):
        tiny_config("dino", tmp_path, micro_batch=3)
    with pytest.raises(ValueError, match="normalizes over the micro-batch"):
        tiny_config("simclr", tmp_path, micro_batch=1)
