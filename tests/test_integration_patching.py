"""What every integration's patch() shares: the checks against an upstream that changed, and
patching a model around torch.compile, DDP and FSDP2 (on a timm ViT, the smallest real model;
the swap is the same mechanism for every integration)."""

import copy
import functools
import importlib
import importlib.metadata

import pytest
import torch
from distributed import run_distributed

import fastssl
from fastssl.integrations import UpstreamMismatch, _patching

# integration -> (an upstream module, a name patch() replaces there)
REPLACED = {"timm": ("timm.layers.attention", "Attention"), "lightly": ("lightly.loss", "DINOLoss"),
            "dinov2": ("dinov2.loss", "iBOTPatchLoss"), "diffsort": ("diffsort.diffsort", "DiffSortNet")}


def integration_of(name):
    pytest.importorskip(name)
    return importlib.import_module(f"fastssl.integrations.{name}")


@pytest.fixture(autouse=True)
def unpatched():
    yield
    for name in REPLACED:
        module = importlib.import_module(f"fastssl.integrations.{name}") if importlib.util.find_spec(name) else None
        if module is not None:
            module.unpatch()


# ----------------------------------------------------------------------------- an upstream that changed


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_a_renamed_upstream_name_is_named_and_nothing_is_patched(name, monkeypatch):
    integration = integration_of(name)
    module_name, attribute = REPLACED[name]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, f"{attribute}V2", getattr(module, attribute), raising=False)
    monkeypatch.delattr(module, attribute)  # an untested release that renamed it
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "99.0")
    for call in (integration.patch, lambda: integration.patch(model=torch.nn.Linear(2, 2))):
        with pytest.raises(UpstreamMismatch, match=f"{module_name} has no attribute '{attribute}'") as error:
            call()
        assert f"{name} 99.0 (NOT among the tested versions: {', '.join(integration.TESTED_VERSIONS)})" \
            in str(error.value)
        assert "nothing was patched" in str(error.value) and not integration._PATCH.active


def test_a_changed_signature_or_a_new_method_is_named(monkeypatch):
    integration = integration_of("lightly")
    lightly_loss = importlib.import_module("lightly.loss")
    upstream = lightly_loss.DINOLoss

    class RenamedArgument(upstream):
        def __init__(self, output_dim=65536, warmup_teacher_temp=0.04, teacher_temperature=0.04):
            super().__init__(output_dim, warmup_teacher_temp, teacher_temperature)

        def cancel_center(self):
            pass

    monkeypatch.setattr(lightly_loss, "DINOLoss", RenamedArgument)
    with pytest.raises(UpstreamMismatch) as error:
        integration.patch()
    message = str(error.value)
    assert "lightly.loss.DINOLoss takes (output_dim, warmup_teacher_temp, teacher_temperature); fastssl's takes " \
           "(output_dim, warmup_teacher_temp, teacher_temp, " in message
    assert "lightly.loss.DINOLoss.cancel_center is not provided by fastssl's DINOLoss" in message
    assert lightly_loss.SwaVLoss is not integration.SwaVLoss  # not patched half


def test_the_installed_versions_are_tested_ones():
    for name in REPLACED:
        integration = integration_of(name)
        assert integration._PATCH.upstream.is_tested(), (name, importlib.metadata.version(name))
        integration._PATCH.check()


# ----------------------------------------------------------------------------- order: torch.compile


def tiny_vit():
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                            num_heads=1, num_classes=0).eval()


class Spy:
    """Counts the runs of fastssl's timm Attention.forward (under dynamo: each trace of it)."""

    def __init__(self, monkeypatch, cls):
        self.calls, forward = 0, cls.forward

        @functools.wraps(forward)  # the same signature, which patch() checks
        def counting(module, *args, **kwargs):
            self.calls += 1
            return forward(module, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)


def test_patch_and_unpatch_after_torch_compile_recompile(monkeypatch):
    """Dynamo guards each module's class, so the compiled model retraces after the swap and
    runs fastssl's forward; after unpatch, timm's again. Compiling after patching needs nothing."""
    timm_integration = integration_of("timm")
    spy = Spy(monkeypatch, timm_integration.Attention)
    vit, images = tiny_vit(), torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(vit, backend="eager")  # dynamo's tracing and guards, without inductor's build
    with fastssl.use_backend("reference"), torch.no_grad():
        timm_output = compiled(images)
        assert spy.calls == 0
        timm_integration.patch(model=compiled)
        assert type(vit.blocks[0].attn) is timm_integration.Attention
        assert torch.equal(compiled(images), vit(images)) and spy.calls > 0  # traced again, then eager
        timm_integration.unpatch(model=compiled)
        calls = spy.calls
        assert torch.equal(compiled(images), timm_output) and spy.calls == calls
        compiled_after = torch.compile(timm_integration.patch(model=tiny_vit()), backend="eager")
        compiled_after(images)
        assert spy.calls > calls
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- order: DDP and FSDP2


def _ddp_worker(rank, world_size, patch_before_wrapping):
    from torch.nn.parallel import DistributedDataParallel

    from fastssl.integrations import timm as timm_integration

    vit = tiny_vit()  # the same weights on both ranks (the harness seeds each task alike)
    local = timm_integration.patch(model=copy.deepcopy(vit))
    if patch_before_wrapping:
        ddp = DistributedDataParallel(timm_integration.patch(model=vit))
    else:
        ddp = DistributedDataParallel(vit)
        parameters = list(ddp.parameters())
        timm_integration.patch(model=ddp)  # DDP's buckets hold the same parameter objects
        assert list(ddp.parameters()) == parameters
    assert type(vit.blocks[0].attn) is timm_integration.Attention
    images = torch.randn(2 * world_size, 3, 32, 32)[2 * rank:2 * rank + 2]
    with fastssl.use_backend("reference"):
        ddp(images).square().sum().backward()
        local(images).square().sum().backward()
    for parameter, local_parameter in zip(vit.parameters(), local.parameters()):
        mean = local_parameter.grad / world_size  # DDP divides before it sums: exact (by a power of two)
        torch.distributed.all_reduce(mean)
        assert torch.equal(parameter.grad, mean)


@pytest.mark.parametrize("patch_before_wrapping", [True, False], ids=["patch-then-wrap", "wrap-then-patch"])
def test_ddp_either_order(patch_before_wrapping):
    pytest.importorskip("timm")
    run_distributed(_ddp_worker, patch_before_wrapping)


def _fsdp_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fastssl.integrations import timm as timm_integration

    mesh = init_device_mesh("cpu", (world_size,))
    vit = tiny_vit()
    local = timm_integration.patch(model=copy.deepcopy(vit))
    patched_first = timm_integration.patch(model=copy.deepcopy(vit))
    for model in (vit, patched_first):
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    timm_integration.patch(model=vit)  # the attention layers inside the sharded blocks: their class only
    assert type(vit.blocks[0].attn) is timm_integration.Attention
    assert all(isinstance(parameter, DTensor) for parameter in vit.parameters())
    images = torch.randn(2, 3, 32, 32)
    with fastssl.use_backend("reference"):
        assert torch.equal(vit(images), local(images)) and torch.equal(patched_first(images), local(images))
        vit(images).square().sum().backward()
    assert all(isinstance(parameter.grad, DTensor) for parameter in vit.parameters())
    timm_integration.unpatch(model=vit)
    assert type(vit.blocks[0].attn) is timm_integration._TIMM_ATTENTION

    attention_sharded_itself = tiny_vit()
    fully_shard(attention_sharded_itself.blocks[0].attn, mesh=mesh)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) was passed to fully_shard itself"):
        timm_integration.patch(model=attention_sharded_itself)
    assert type(attention_sharded_itself.blocks[1].attn) is timm_integration._TIMM_ATTENTION  # nothing swapped


def test_fully_shard_then_patch():
    pytest.importorskip("timm")
    run_distributed(_fsdp_worker)


def test_swap_modules_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        _patching.swap_modules([torch.nn.Linear(1, 1)], [])
