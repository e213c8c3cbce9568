import copy
import inspect
import sys
import types

import pytest
import torch
from accuracy import assert_accurate, float32_baseline, output_rounding

import fastssl
from fastssl.integrations import timm as timm_integration
from fastssl.nn import MultiCropAttention, PackedViT

timm = pytest.importorskip("timm")
vision_transformer = timm.models.vision_transformer

# In a dict: patch() rebinds every module-level name that refers to timm's class, this
# module's too, and these tests need the original while patched.
UPSTREAM = {"Attention": timm.layers.attention.Attention}


@pytest.fixture(autouse=True)
def restore_timm():
    """A failing test must not leave timm patched for the tests after it."""
    yield
    timm_integration.unpatch()


def tiny_vit(**kwargs):
    """Head dim 64 (the kernels' main case), patch 8 at 32 px: 16 patches and a CLS token."""
    options = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0,
                   dynamic_img_size=True)
    return vision_transformer.VisionTransformer(**dict(options, **kwargs))


def attention_layers(vit):
    return [block.attn for block in vit.blocks]


def assert_timms_attention(vit):
    assert all(type(attn) is UPSTREAM["Attention"] for attn in attention_layers(vit))


def assert_fastssls_attention(vit):
    assert all(type(attn) is timm_integration.Attention for attn in attention_layers(vit))
    assert all(isinstance(attn, MultiCropAttention) for attn in attention_layers(vit))


def test_vits_built_after_patch_have_fastssl_attention():
    with timm_integration.patch():
        assert_fastssls_attention(tiny_vit())
        assert_fastssls_attention(tiny_vit(attn_layer="attn"))  # looked up in timm's ATTN_LAYERS registry
        assert_fastssls_attention(tiny_vit(block_fn=vision_transformer.ResPostBlock))
        assert_fastssls_attention(timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0))


def test_unpatch_restores_timm():
    defaults_before = vision_transformer.Block.__init__.__defaults__
    registry_before = vision_transformer.ATTN_LAYERS
    timm_integration.patch()
    timm_integration.unpatch()
    assert timm.layers.Attention is UPSTREAM["Attention"] and vision_transformer.Attention is UPSTREAM["Attention"]
    assert vision_transformer.Block.__init__.__defaults__ is defaults_before
    assert vision_transformer.ATTN_LAYERS is registry_before and registry_before["attn"] is UPSTREAM["Attention"]
    assert_timms_attention(tiny_vit())
    assert_timms_attention(tiny_vit(attn_layer="attn"))


def test_patch_reaches_names_imported_before_patching(monkeypatch):
    script = types.ModuleType("user_training_script")
    exec("from timm.layers import Attention", script.__dict__)
    monkeypatch.setitem(sys.modules, script.__name__, script)
    patch = timm_integration.patch()
    assert patch.active and timm_integration.patch() is patch  # patching twice is a no-op
    assert script.Attention is timm_integration.Attention
    timm_integration.unpatch()
    assert script.Attention is UPSTREAM["Attention"]


def test_state_dicts_load_both_ways():
    timm_vit = tiny_vit()
    with timm_integration.patch():
        fastssl_vit = tiny_vit()
    assert list(fastssl_vit.state_dict()) == list(timm_vit.state_dict())
    fastssl_vit.load_state_dict(timm_vit.state_dict())
    for name, value in timm_vit.state_dict().items():
        assert torch.equal(fastssl_vit.state_dict()[name], value), name
    timm_vit.load_state_dict(tiny_vit().state_dict())  # another timm ViT's weights, then ours back
    timm_vit.load_state_dict(fastssl_vit.state_dict())
    for name, value in fastssl_vit.state_dict().items():
        assert torch.equal(timm_vit.state_dict()[name], value), name


def features_and_input_gradient(vit_of_dtype, images, feature_weights):
    """``forward_features`` and d(sum of features * feature_weights)/d(images); ``vit_of_dtype``
    maps the images' dtype to the model that runs them. (A random linear loss: the sum of
    squared LayerNorm'd features is nearly constant, so its gradient is mostly cancellation.)"""
    images = images.detach().clone().requires_grad_()
    features = vit_of_dtype[images.dtype].forward_features(images)
    (features * feature_weights).sum().backward()
    return features.detach(), images.grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("size", [32, 16], ids=["32px", "16px"])
def test_forward_features_and_input_gradients_equal_timms(backend, size):
    timm_vit = tiny_vit().eval()
    with timm_integration.patch():
        fastssl_vit = tiny_vit().eval()
    fastssl_vit.load_state_dict(timm_vit.state_dict())
    images = torch.randn(2, 3, size, size)
    feature_weights = torch.randn(2, 1 + (size // 8) ** 2, 128)  # CLS and the patches, embed_dim
    # exact: timm in float64; baseline: the worst of timm in float32 and simulated float32 roundings of it.
    timm_vits = {torch.float32: timm_vit, torch.float64: copy.deepcopy(timm_vit).double()}
    baseline, exact = float32_baseline(lambda *tensors: features_and_input_gradient(timm_vits, *tensors),
                                       images, feature_weights)
    with fastssl.use_backend(backend):
        actual = features_and_input_gradient({torch.float32: fastssl_vit}, images, feature_weights)
    for value, base, expected, what in zip(actual, baseline, exact, ("features", "input gradient")):
        assert_accurate(value, base, expected, atol=output_rounding(expected, torch.float32), what=what)


def per_resolution(vit, crops):
    return tuple(vit.forward_features(images) for images in crops)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_vit_runs_a_patched_vit(backend):
    with timm_integration.patch():
        fastssl_vit = tiny_vit().eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    timm_vit = tiny_vit().eval()
    timm_vit.load_state_dict(fastssl_vit.state_dict())
    timm_vits = {torch.float32: timm_vit, torch.float64: copy.deepcopy(timm_vit).double()}
    baseline, exact = float32_baseline(lambda *groups: per_resolution(timm_vits[groups[0].dtype], groups), *crops)
    with fastssl.use_backend(backend):
        packed = PackedViT(fastssl_vit)(crops)
    # Packing runs the token-wise layers on one (tokens, C) matrix, rounding in another order
    # than timm's per-resolution batches, as validly: the same rule applies.
    for value, base, expected in zip(packed, baseline, exact):
        assert_accurate(value, base, expected, atol=output_rounding(expected, torch.float32), what="packed features")


def timm_arguments_in_order(**arguments):
    """The positional form of a call to timm's Attention (its own parameter order, which timm
    has changed between releases), up to the last argument given."""
    names = list(inspect.signature(UPSTREAM["Attention"]).parameters)
    last = max(names.index(name) for name in arguments)
    defaults = inspect.signature(UPSTREAM["Attention"]).parameters
    return [arguments.get(name, defaults[name].default) for name in names[:last + 1]]


@pytest.mark.parametrize("arguments", [
    dict(dim=64),
    dict(dim=64, num_heads=2, qkv_bias=True, proj_bias=False),
    dict(dim=64, num_heads=4, qk_norm=True, scale_norm=True, norm_layer=torch.nn.LayerNorm, attn_head_dim=16),
], ids=["defaults", "biases", "norms"])
def test_attention_keeps_timms_constructor_and_attributes(arguments):
    assert inspect.signature(timm_integration.Attention) == inspect.signature(UPSTREAM["Attention"])
    positional = timm_arguments_in_order(**arguments)
    for upstream, ours in [(UPSTREAM["Attention"](**arguments), timm_integration.Attention(**arguments)),
                           (UPSTREAM["Attention"](*positional), timm_integration.Attention(*positional))]:
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in
                                                                      upstream.state_dict().items()}
        for name in ("num_heads", "head_dim", "attn_dim", "scale", "fused_attn", "gate"):
            assert getattr(ours, name) == getattr(upstream, name), name


@pytest.mark.parametrize("arguments,error,message", [
    (dict(gated=True), ValueError, "cannot serve gated=True"),
    (dict(dim_out=32), ValueError, "cannot serve dim_out=32"),
    (dict(attn_head_dim=16), ValueError, "cannot serve attn_head_dim=16"),
    (dict(depth=3), TypeError, "depth"),  # timm's Attention takes no depth either
], ids=["gated", "dim-out", "head-dim", "unknown-argument"])
def test_unsupported_options_raise_clearly(arguments, error, message):
    with pytest.raises(error, match=message):
        timm_integration.Attention(64, num_heads=2, **arguments)


# ----------------------------------------------------------------------------- models built before patching


def parameters_and_buffers(module):
    return [*module.parameters(), *module.buffers()]


def test_patch_a_built_model_in_place_equals_patching_before_the_build():
    vit = tiny_vit().eval()
    tensors, keys = parameters_and_buffers(vit), list(vit.state_dict())
    optimizer = torch.optim.SGD(vit.parameters(), lr=0.1)
    assert timm_integration.patch(model=vit) is vit
    assert_fastssls_attention(vit)
    assert all(a is b for a, b in zip(parameters_and_buffers(vit), tensors))  # the same tensors, not copies
    assert list(vit.state_dict()) == keys
    with timm_integration.patch():
        built_patched = tiny_vit().eval()
    built_patched.load_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with fastssl.use_backend("reference"):
        assert torch.equal(vit(images), built_patched(images))
        vit(images).square().sum().backward()
    weight = vit.blocks[0].attn.qkv.weight
    before = weight.detach().clone()
    optimizer.step()  # the optimizer built before patching trains the patched model's weights
    assert vit.blocks[0].attn.qkv.weight is weight and not torch.equal(weight, before)


def test_unpatch_a_model_restores_timms_layers_exactly():
    vit = tiny_vit().eval()
    attributes = [dict(vars(attn)) for attn in attention_layers(vit)]
    timm_integration.unpatch(model=timm_integration.patch(model=vit))
    assert_timms_attention(vit)
    assert [dict(vars(attn)) for attn in attention_layers(vit)] == attributes
    with timm_integration.patch():
        built_patched = tiny_vit()
    timm_integration.unpatch(model=built_patched)  # a model built while patched, too
    assert_timms_attention(built_patched)
    timm_integration.patch(model=tiny_vit())
    assert timm.layers.Attention is UPSTREAM["Attention"]  # patching a model leaves timm's names alone


def test_checkpoint_saved_patched_loads_unpatched_and_back(tmp_path):
    vit = timm_integration.patch(model=tiny_vit())
    torch.save(vit.state_dict(), tmp_path / "patched.pt")
    unpatched = tiny_vit()
    unpatched.load_state_dict(torch.load(tmp_path / "patched.pt"))
    torch.save(unpatched.state_dict(), tmp_path / "unpatched.pt")
    patched_again = timm_integration.patch(model=tiny_vit())
    patched_again.load_state_dict(torch.load(tmp_path / "unpatched.pt"))
    for name, value in vit.state_dict().items():
        assert torch.equal(patched_again.state_dict()[name], value), name


def test_patching_a_model_the_kernels_cannot_serve_changes_nothing():
    vit = tiny_vit()
    vit.blocks[1].attn = UPSTREAM["Attention"](128, num_heads=2, attn_head_dim=32)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn \(Attention\): its heads \(2 x 32\)"):
        timm_integration.patch(model=vit)
    assert_timms_attention(vit)  # block 0 was not swapped either
