"""``fastssl plan``: the memory and the work of one training step at a recipe's real size,
predicted on any machine (no GPU needed) before GPU time is rented.

One whole step of the trainer (:func:`fastssl.train.loop.train_step`: student and teacher
forward, the loss, backward, clipping, the optimizer step and the teacher's EMA update) runs
on the ``meta`` device, where tensors have shapes, dtypes and storages but no values, in
seconds at any size. Around it:

- :class:`GpuModel` (a ``TorchFunctionMode``) makes the step what it is on the GPU:
  autocast as CUDA applies it, and ``scaled_dot_product_attention`` as the kernel PyTorch
  runs there (FlashAttention for 16-bit inputs without a mask, else the memory-efficient
  kernel). Autocast does not act on meta tensors, and it acts above autograd, so that the
  16-bit copies it makes are what backward keeps: a function mode is the one hook that
  sits there. A dispatch mode sits below autograd and would keep the float32 originals.
- :class:`StepTracker` (an :class:`fastssl.memory.AllocationTracker`) counts every storage
  the step creates, by category (gradients, activations saved for backward, temporaries),
  and each op's FLOPs (``torch.utils.flop_counter``'s formulas, the same as
  ``FlopCounterMode``'s, and the fastssl ops' own) and bytes (its inputs read and outputs
  written once), per component (backbone, attention, heads, loss, optimizer).
  torch's ``MemTracker`` would give the categories too, but not the allocations inside
  fastssl's custom ops (its workspaces), which this tracker follows.
- Values the step reads on the host (DINOv2's mask positions, sequence offsets) are
  computed on the CPU from the batch's real metadata ("known" tensors); a value read from
  data (a loss checked for being finite) reads as 1.

fastssl's kernels run as their fakes (``register_fake``), which allocate what their GPU
launchers allocate (``tests/test_plan.py`` checks this against real runs). Parameters,
buffers, the optimizer's state (after a first step) and the batch exist before the step and
are counted apart. All figures are a model: no GPU ran them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._foreach_utils as foreach_utils
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from fastssl.devices import TARGETS
from fastssl.memory import AllocationTracker
from fastssl.train.config import TrainConfig, validate

GB = 1e9

# ---------------------------------------------------------------------------- device model


@dataclass(frozen=True)
class Throughput:
    """Dense peak rates from the vendors' datasheets: 16-bit matrix math with float32
    accumulation, float32 (non-tensor) math, and memory bandwidth."""

    matmul16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float


# NVIDIA datasheets and architecture whitepapers (GeForce cards: 16-bit tensor math with float32
# accumulation, half their float16-accumulation rate); AMD CDNA2/3 datasheets (MI250X per GCD:
# half the package). SXM parts for A100 80 GB, H100, H200, B200.
THROUGHPUT = {
    "v100": Throughput(125, 15.7, 900), "t4": Throughput(65, 8.1, 320),
    "a100": Throughput(312, 19.5, 2039), "rtx3090": Throughput(71, 35.6, 936),
    "a6000": Throughput(155, 38.7, 768), "rtx4090": Throughput(165, 82.6, 1008),
    "l4": Throughput(121, 30.3, 300), "l40s": Throughput(362, 91.6, 864),
    "h100": Throughput(989, 67, 3350), "h200": Throughput(989, 67, 4800),
    "b200": Throughput(2250, 75, 8000), "rtx5090": Throughput(210, 105, 1792),
    "mi250x": Throughput(191.5, 24, 1600), "mi300x": Throughput(1307, 163, 5300),
}

# What a step may use of a GPU's memory: the CUDA context, cuBLAS/cuDNN workspaces and the
# NCCL buffers of a multi-GPU run take about 1 GB; the caching allocator's rounding and
# fragmentation about 10% of the rest (PyTorch's CUDA memory notes; DINO's logs at 13.9 GB
# max for the 16 GB V100 run agree with the margin).
CONTEXT_BYTES = 1.0 * GB
ALLOCATOR_SHARE = 0.90


def usable_bytes(memory_gb: float) -> float:
    return ALLOCATOR_SHARE * (memory_gb * GB - CONTEXT_BYTES)


def autocast_dtype(gpu: str) -> torch.dtype:
    """bfloat16 where the GPU has it, float16 (T4, V100) otherwise: the trainer's choice."""
    return torch.bfloat16 if TARGETS[gpu].bf16 else torch.float16


# ---------------------------------------------------------------------------- the GPU's step

# CUDA autocast's policy (PyTorch's autocast_mode.cpp op lists), by the torch function's name.
_LOWER_PRECISION = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv",
    "addr", "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "prelu", "chain_matmul", "multi_dot", "scaled_dot_product_attention"})
_FLOAT32 = frozenset({
    "layer_norm", "group_norm", "exp", "log", "log2", "log10", "log1p", "expm1", "pow", "__pow__", "rsqrt",
    "reciprocal", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "cosine_similarity", "cdist",
    "pdist", "dist", "renorm", "logsumexp", "cross_entropy", "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "binary_cross_entropy_with_logits", "norm", "vector_norm", "matrix_norm",
    # composites whose first op is on the list (norm): their result is float32 too
    "normalize"})
# Run in float32 through their dtype argument (no float32 copy of the input is made).
_FLOAT32_OUTPUT = frozenset({"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod"})
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_TAG = "fastssl.plan.component"  # an autograd node's metadata: the component whose forward made it


class GpuModel(TorchFunctionMode):
    """The step as a CUDA GPU runs it, on any device: ``scaled_dot_product_attention`` as
    the fused kernel PyTorch picks on a GPU, and, inside :meth:`autocast`, CUDA autocast's
    casts (its weight-cast cache included). Also tags each autograd node with the component
    whose forward made it, so that :class:`StepTracker` attributes backward work too."""

    def __init__(self, component: Callable[[], str], on_node: Callable[[Any, str], None]):
        super().__init__()
        self.dtype: Optional[torch.dtype] = None  # set inside autocast()
        self._cast_cache: dict[int, torch.Tensor] = {}
        self._component = component
        self._on_node = on_node

    def autocast(self, dtype: torch.dtype) -> "_AutocastRegion":
        """A reusable context manager: CUDA autocast to ``dtype`` inside (with the mode active)."""
        return _AutocastRegion(self, dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if self.dtype is not None:
            args, kwargs = self._autocast(name, args, kwargs)
        if name == "scaled_dot_product_attention":
            result = _fused_attention(*args, **kwargs)
        else:
            result = func(*args, **kwargs)
        self._tag_nodes(result)
        return result

    def _autocast(self, name: str, args, kwargs):
        if name in _LOWER_PRECISION:
            return tree_map(lambda x: self._cast(x, torch.float32, self.dtype), (args, kwargs))
        if name in _FLOAT32:
            return tree_map(lambda x: self._cast(x, self.dtype, torch.float32), (args, kwargs))
        if name in _FLOAT32_OUTPUT and kwargs.get("dtype") is None and args and \
                isinstance(args[0], torch.Tensor) and args[0].dtype in _SIXTEEN_BIT:
            kwargs["dtype"] = torch.float32
        return args, kwargs

    def _cast(self, x, source: torch.dtype, dtype: torch.dtype):
        if not isinstance(x, torch.Tensor) or x.dtype != source or not x.is_floating_point():
            return x
        if not (x.is_leaf and x.requires_grad):
            return x.to(dtype)
        if id(x) not in self._cast_cache:
            self._cast_cache[id(x)] = x.to(dtype)
        return self._cast_cache[id(x)]

    def _tag_nodes(self, result) -> None:
        """The autograd nodes this call made (its outputs' and, behind them, those of the ops
        it ran inside, back to nodes made earlier)."""
        component = None
        stack = [getattr(x, "grad_fn", None) for x in tree_flatten(result)[0] if isinstance(x, torch.Tensor)]
        while stack:
            node = stack.pop()
            if node is None or _TAG in node.metadata or type(node).__name__ == "AccumulateGrad":
                continue
            component = component or self._component()
            self._on_node(node, component)
            stack.extend(next_node for next_node, _ in node.next_functions)


class _AutocastRegion:
    """Autocast to ``dtype`` (None: off) while inside; reusable, as the trainer enters its
    autocast once per micro-batch."""

    def __init__(self, model: GpuModel, dtype: Optional[torch.dtype]):
        self.model, self.dtype = model, dtype

    def __enter__(self):
        self.previous, self.model.dtype = self.model.dtype, self.dtype

    def __exit__(self, *exc_info):
        self.model.dtype = self.previous
        if self.previous is None:  # as autocast's cache, emptied when the outermost region ends
            self.model._cast_cache.clear()


@contextlib.contextmanager
def _as_on_a_gpu(model: GpuModel):
    """What the step's own code does on a GPU: ``torch.autocast(device, enabled=False)`` (a
    loss kept in float32) turns the model's autocast off, activation checkpointing
    recomputes under the autocast of the forward, as torch's checkpoint does with CUDA's, and
    gradient clipping takes its foreach path."""
    def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if enabled:
            raise NotImplementedError("fastssl plan models the trainer's autocast only; the step enters another")
        return _AutocastRegion(model, None)

    def checkpoint(function, *args, **kwargs):
        forward_dtype = model.dtype

        def under_forward_autocast(*inputs, **keywords):
            # the recompute runs inside backward, where torch function modes are off: back on
            active = model in torch.overrides._get_current_function_mode_stack()
            with contextlib.nullcontext() if active else model, _AutocastRegion(model, forward_dtype):
                return function(*inputs, **keywords)
        return real_checkpoint(under_forward_autocast, *args, **kwargs)

    def foreach_devices() -> list[str]:  # gradient clipping's foreach kernels, as on a GPU
        return [*real_foreach_devices(), "meta"]

    real_autocast, real_checkpoint = torch.autocast, torch.utils.checkpoint.checkpoint
    real_foreach_devices = foreach_utils._get_foreach_kernels_supported_devices
    torch.autocast, torch.utils.checkpoint.checkpoint = autocast, checkpoint
    foreach_utils._get_foreach_kernels_supported_devices = foreach_devices
    try:
        yield
    finally:
        torch.autocast, torch.utils.checkpoint.checkpoint = real_autocast, real_checkpoint
        foreach_utils._get_foreach_kernels_supported_devices = real_foreach_devices


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """SDPA as the GPU runs it: FlashAttention for 16-bit inputs without a mask, else the
    memory-efficient kernel (float32, or a mask); both keep only the output and the log-sum-exp."""
    if enable_gqa:
        raise ValueError("fastssl plan: grouped-query attention is not modeled")
    if query.device.type == "cpu":  # the tests' real runs: the CPU's flash kernel keeps the same tensors
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    if attn_mask is None and query.dtype in _SIXTEEN_BIT and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    needs_lse = any(x.requires_grad for x in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale)[0]


# ---------------------------------------------------------------------------- counting

COMPONENTS = ("backbone", "attention", "heads", "loss", "optimizer")
CATEGORIES = ("parameters", "optimizer_state", "batch", "gradients", "activations", "temporaries")


def _attention_flops(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> int:
    total, heads, head_dim = q.shape
    lengths = _known_values(cu_seqlens)
    if lengths is not None:
        lengths = lengths.diff().tolist()
    else:  # offsets unknown: every sequence as long as the longest
        lengths = [max_seqlen] * (total // max(max_seqlen, 1))
    return 4 * sum(n * n for n in lengths) * heads * head_dim


def _info_nce_flops(args) -> int:
    query, keys = args[0], args[1]
    return 2 * query.shape[0] * keys.shape[0] * query.shape[1]


def _soft_sort_flops(args, passes: int) -> int:
    from fastssl.ops.soft_sort import soft_sort_flops

    x, network = args[0], args[2]
    return soft_sort_flops(x.shape[0], network, x.shape[1]) * passes // 4


# fastssl's custom ops: FLOPs as their kernels do them (see each op's *_flops function).
_FASTSSL_FLOPS = {
    "varlen_attention_fwd": lambda args: _attention_flops(args[0], args[3], args[4]),
    "varlen_attention_bwd": lambda args: int(2.5 * _attention_flops(args[1], args[6], args[7])),
    "info_nce_fwd": _info_nce_flops,
    "info_nce_bwd": lambda args: 2 * _info_nce_flops(args[1:]) * (1 + bool(args[7])),
    "soft_sort_fwd": lambda args: _soft_sort_flops(args, 1),
    "soft_sort_bwd": lambda args: _soft_sort_flops(args[2:], 3),
}
_NO_TRAFFIC = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh",
                         "_local_scalar_dense", "detach", "set_"})
_MAX_KNOWN_ELEMENTS = 1 << 20

_known = WeakIdKeyDictionary()  # meta tensor -> its values on the CPU


def _known_values(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    if tensor.device.type != "meta":
        return tensor
    return _known.get(tensor)


def make_known(values: torch.Tensor) -> torch.Tensor:
    """A meta tensor standing for ``values`` (metadata of the batch: masks, boxes, offsets)."""
    meta = torch.empty_strided(values.shape, values.stride(), dtype=values.dtype, device="meta")
    _known[meta] = values
    return meta


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _to_cpu_device(value):
    return torch.device("cpu") if isinstance(value, torch.device) and value.type == "meta" else value


def _component_of_op(func, name: str) -> Optional[str]:
    """Ops that belong to a component wherever they run: attention kernels, fastssl's losses,
    the foreach updates of the optimizer, the gradient clipping and the teacher's EMA."""
    if "attention" in name:
        return "attention"
    if func.namespace == "fastssl":
        return "loss"
    if name.startswith("_foreach"):
        return "optimizer"
    return None


class StepTracker(AllocationTracker):
    """Live bytes by category with their split at the peak; FLOPs and bytes per component.

    Gradients are the storages autograd accumulates into parameters, activations those
    that autograd saves for backward; the rest are temporaries."""

    def __init__(self, parameters: list[torch.Tensor]):
        super().__init__()
        self.categories = dict.fromkeys(("gradients", "activations", "temporaries"), 0)
        self.at_peak = dict(self.categories)
        self.saved_by_component = dict.fromkeys(COMPONENTS, 0)  # the activations, by the component saving them
        self.saved_at_peak = dict(self.saved_by_component)
        self._saved_by: dict[int, str] = {}
        self._category: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self.ops: Counter[tuple[str, int, int, bool]] = Counter()  # (component, FLOPs, bytes, 16-bit) -> ops
        self.modules: dict[int, str] = {}
        self._module_stack: list[str] = []
        self._backward_component: Optional[str] = None
        self.in_optimizer = False
        self.counting = True  # False: a warm-up step, values read on the host only
        self._inside_fastssl_op = 0
        self._hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
            torch.nn.modules.module.register_module_forward_hook(self._leave_module),
        ]
        self._hooks += [parameter.register_post_accumulate_grad_hook(self._gradient)
                        for parameter in parameters if parameter.requires_grad]
        self.model = GpuModel(self.component, self._tag_node)

    # components
    def component(self) -> str:
        if self.in_optimizer:
            return "optimizer"
        if self._module_stack:
            return self._module_stack[-1]
        if torch._C._current_graph_task_id() != -1:  # inside backward: the running node's component
            return self._backward_component or "loss"
        return "loss"  # forward, outside the networks: the loss's own code

    def _enter_module(self, module, inputs) -> None:
        parent = self._module_stack[-1] if self._module_stack else "loss"
        self._module_stack.append(self.modules.get(id(module), parent))

    def _leave_module(self, module, inputs, outputs) -> None:
        self._module_stack.pop()

    def _tag_node(self, node, component: str) -> None:
        node.metadata[_TAG] = component

        def enter(grad_outputs):
            self._backward_component = component
        node.register_prehook(enter)

    # categories
    def _count(self, storage) -> None:
        key = storage._cdata
        if key in self._counted:
            return
        self._category[key] = "temporaries"
        self._sizes[key] = storage.nbytes()
        self.categories["temporaries"] += storage.nbytes()
        super()._count(storage)
        self._snapshot_at_peak()

    def _snapshot_at_peak(self) -> None:
        if self.live_bytes == self.peak_bytes:
            self.at_peak = dict(self.categories)
            self.saved_at_peak = dict(self.saved_by_component)

    def _free(self, key: int, size: int) -> None:
        self.categories[self._category.pop(key)] -= self._sizes.pop(key)
        if key in self._saved_by:
            self.saved_by_component[self._saved_by.pop(key)] -= size
        super()._free(key, size)

    def _move(self, tensor: torch.Tensor, category: str) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self._category and self._category[key] != category:
            self.categories[self._category[key]] -= self._sizes[key]
            self.categories[category] += self._sizes[key]
            self._category[key] = category
            if category == "activations":  # whose forward saved it
                self._saved_by[key] = self.component()
                self.saved_by_component[self._saved_by[key]] += self._sizes[key]
            self._snapshot_at_peak()  # a tensor saved (or made a gradient) just as it made the peak

    def _gradient(self, parameter: torch.Tensor) -> None:
        if parameter.grad is not None:
            self._move(parameter.grad, "gradients")

    def saved_for_backward(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._category.get(tensor.untyped_storage()._cdata) == "temporaries":
            self._move(tensor, "activations")
        return tensor

    # ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            values = _known_values(args[0])
            return 1 if values is None else values.item()
        outputs = self._run_known(func, args, kwargs)
        if not self.counting:
            return func(*args, **kwargs) if outputs is None else outputs
        if outputs is None:
            self._inside_fastssl_op += func.namespace == "fastssl"
            try:
                outputs = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self._inside_fastssl_op -= func.namespace == "fastssl"
        if not self._inside_fastssl_op:  # a fastssl op's work is its own inputs and outputs, not its fake's
            self._account(func, args, kwargs, outputs)
        return outputs

    def _run_known(self, func, args, kwargs):
        """Ops on known tensors only (and no large ones) run on their CPU values."""
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        to_meta = any(isinstance(x, torch.device) and x.type == "meta" for x in leaves)
        if not tensors or not (to_meta or any(x.device.type == "meta" for x in tensors)):
            return None
        values = [_known_values(x) for x in tensors]
        if any(v is None for v in values) or sum(v.numel() for v in values) > _MAX_KNOWN_ELEMENTS:
            return None
        cpu_args, cpu_kwargs = tree_map(
            lambda x: _known_values(x) if isinstance(x, torch.Tensor) else _to_cpu_device(x), (args, kwargs))
        results = func(*cpu_args, **cpu_kwargs)
        outputs = tree_map(lambda x: make_known(x) if isinstance(x, torch.Tensor) else x, results)
        for output in tree_flatten(outputs)[0]:
            if isinstance(output, torch.Tensor) and self.counting:
                self._count(output.untyped_storage())
        return outputs

    def _account(self, func, args, kwargs, outputs) -> None:
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _NO_TRAFFIC:
            return
        component = _component_of_op(func, name) or self.component()
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        results = [x for x in tree_flatten(outputs)[0] if isinstance(x, torch.Tensor)]
        flops = self._flops(func, name, args, kwargs, outputs)
        sixteen = bool(flops) and any(x.dtype in _SIXTEEN_BIT for x in inputs)
        self.ops[component, flops, sum(_nbytes(x) for x in inputs + results), sixteen] += 1

    @staticmethod
    def _flops(func, name, args, kwargs, outputs) -> int:
        if func.namespace == "fastssl":
            formula = _FASTSSL_FLOPS.get(name)
            return formula(args) if formula else 0
        formula = flop_registry.get(func._overloadpacket)
        return int(formula(*args, **kwargs, out_val=outputs)) if formula else 0

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


# ---------------------------------------------------------------------------- one step


@dataclass
class StepPlan:
    """One step's memory (bytes by category, at the peak) and work (its ops, by component)."""

    batch_size: int
    micro_batch: Optional[int]
    peak_bytes: int
    categories: dict[str, int]
    ops: Counter  # (component, FLOPs, bytes, 16-bit) -> how many such ops
    activations: dict[str, int]  # the activations at the peak by the component that saved them

    def totals(self, component: str) -> tuple[int, int]:
        """(FLOPs, bytes) of ``component``."""
        flops = sum(f * n for (c, f, _, _), n in self.ops.items() if c == component)
        moved = sum(b * n for (c, _, b, _), n in self.ops.items() if c == component)
        return flops, moved

    def seconds(self, throughput: Throughput) -> dict[str, float]:
        """Each component's time on a GPU of ``throughput``, op by op the roofline's:
        ``max(FLOPs / peak rate, bytes / bandwidth, launch)``. A model of ideal kernels."""
        times = dict.fromkeys(COMPONENTS, 0.0)
        for (component, flops, moved, sixteen), count in self.ops.items():
            rate = (throughput.matmul16_tflops if sixteen else throughput.fp32_tflops) * 1e12
            times[component] += count * max(flops / rate, moved / (throughput.bandwidth_gbs * 1e9), LAUNCH_SECONDS)
        return times


LAUNCH_SECONDS = 4e-6  # a kernel launch's floor on a GPU: the time of a step of many small ops

SAMPLE_IMAGES = 4  # images augmented for real; the batch's metadata repeats theirs


def sample_metadata(config: TrainConfig):
    """The method's batch for SAMPLE_IMAGES random images (its own augmentation and collate)."""
    from fastssl.train.bench_e2e import sample_batch
    from fastssl.train.method import build_method

    small = dataclasses.replace(config, batch_size=SAMPLE_IMAGES, micro_batch=None)
    with torch.device("meta"):
        method = build_method(small, kernels=False)
    return sample_batch(method, small, torch.device("cpu"))


def batch_of(sample, images: int):
    """``sample`` at ``images`` images on the meta device: image tensors (4-D) as shapes only,
    the rest (masks, boxes) known, their values repeated from the sample's images."""
    def scale(x: torch.Tensor) -> torch.Tensor:
        per_image = x.shape[0] // SAMPLE_IMAGES  # crop-major rows: crops x images
        rows = per_image * images
        if x.dim() == 4:
            return torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device="meta")
        repeats = math.ceil(rows / x.shape[0])
        return make_known(x.repeat(repeats, *([1] * (x.dim() - 1)))[:rows].contiguous())
    return tree_map(lambda x: scale(x) if isinstance(x, torch.Tensor) else x, sample)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(value) for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


@contextlib.contextmanager
def launches_sized_for(gpu: Optional[str]):
    """Launchers size their grids and workspaces for ``gpu`` (``FASTSSL_TARGET``) meanwhile."""
    previous = os.environ.get("FASTSSL_TARGET")
    if gpu is not None:
        os.environ["FASTSSL_TARGET"] = gpu
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FASTSSL_TARGET", None)
        else:
            os.environ["FASTSSL_TARGET"] = previous


def plan_step(config: TrainConfig, kernels: bool, dtype: Optional[torch.dtype], sample,
              device: str = "meta") -> StepPlan:
    """One steady-state step of the config's method, as :class:`GpuModel` runs it: after a
    first step (of the sample's few images) has made the optimizer's state. On the meta
    device (the plan) at ``config.batch_size``; on the CPU (the tests' real runs, on the
    sample itself: ``config.batch_size`` must be SAMPLE_IMAGES)."""
    from fastssl.train.bench_e2e import NOMINAL_STEPS_PER_EPOCH
    from fastssl.train.loop import StepPrecision, train_step
    from fastssl.train.method import build_method
    from fastssl.train.optim import Schedules, build_optimizer

    with torch.device(device):
        method = build_method(config, kernels)
    optimizer = build_optimizer(config, method.parameter_groups())
    schedules = Schedules(config, NOMINAL_STEPS_PER_EPOCH)
    if device == "meta":
        batch, first_batch = batch_of(sample, config.batch_size), batch_of(sample, SAMPLE_IMAGES)
    elif config.batch_size == SAMPLE_IMAGES:
        batch = first_batch = sample
    else:
        raise ValueError(f"a step on real tensors runs the sample of {SAMPLE_IMAGES} images, not {config.batch_size}")
    epoch = config.epochs - 1
    modules = method.modules()
    student_parameters = list(modules["student"].parameters())
    tracker = StepTracker(student_parameters)
    tracker.modules.update(_components_of(modules))
    model = tracker.model
    precision = StepPrecision(model.autocast(dtype) if dtype is not None else contextlib.nullcontext())
    optimizer.register_step_pre_hook(lambda *_: setattr(tracker, "in_optimizer", True))

    def step(batch):
        tracker.in_optimizer = False
        with model, _as_on_a_gpu(model), \
                torch.autograd.graph.saved_tensors_hooks(tracker.saved_for_backward, lambda x: x):
            train_step(method, method.student, optimizer, schedules, batch, epoch, epoch * NOMINAL_STEPS_PER_EPOCH,
                       precision)
        optimizer.zero_grad(set_to_none=True)

    with tracker:  # no default device: tensors the step makes from Python values start on the CPU, known
        tracker.counting = False
        step(first_batch)  # the optimizer's state, as after the first step of a run
        tracker.counting = True
        step(batch)
    tracker.close()
    fixed = {
        "parameters": sum(_nbytes(t) for module in modules.values() for t in [*module.parameters(), *module.buffers()]),
        "optimizer_state": _optimizer_state_bytes(optimizer),
        "batch": sum(_nbytes(x) for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor)),
    }
    categories = {**fixed, **tracker.at_peak}
    return StepPlan(config.batch_size, config.micro_batch, sum(categories.values()), categories, tracker.ops,
                    tracker.saved_at_peak)


def _components_of(modules: dict[str, torch.nn.Module]) -> dict[int, str]:
    """Each module's component: attention layers themselves (their projections are backbone),
    the rest of the backbone, the networks' other modules (heads), the loss module."""
    from fastssl.train.models import MultiCropBackbone

    components: dict[int, str] = {}
    for role, root in modules.items():
        for module in root.modules():
            components[id(module)] = "loss" if role == "loss" else "heads"
        if role == "loss":
            continue
        components[id(root)] = "backbone"
        for backbone in (m for m in root.modules() if isinstance(m, MultiCropBackbone)):
            for module in backbone.modules():
                attention = type(module).__name__.endswith("Attention")
                components[id(module)] = "attention" if attention else "backbone"
    return components


# ---------------------------------------------------------------------------- the plan


class StepModel:
    """One config's steps on the meta device at any batch or micro-batch size, each run once."""

    def __init__(self, config: TrainConfig, kernels: bool, dtype: Optional[torch.dtype], sample, gpu: str):
        self.config, self.kernels, self.dtype, self.sample, self.gpu = config, kernels, dtype, sample, gpu
        self._steps: dict[tuple[int, Optional[int]], StepPlan] = {}

    def step(self, batch_size: int, micro_batch: Optional[int] = None) -> StepPlan:
        key = (batch_size, micro_batch if micro_batch is not None and micro_batch < batch_size else None)
        if key not in self._steps:
            config = dataclasses.replace(self.config, batch_size=key[0], micro_batch=key[1])
            with launches_sized_for(self.gpu):
                self._steps[key] = plan_step(config, self.kernels, self.dtype, self.sample)
        return self._steps[key]

    def runs(self, batch_size: int, micro_batch: Optional[int] = None) -> bool:
        """Whether the trainer takes this batch (SwAV's queue, for one, bounds it)."""
        try:
            validate(dataclasses.replace(self.config, batch_size=batch_size, micro_batch=micro_batch))
        except ValueError:
            return False
        return True

    def fits(self, capacity: float, batch_size: int, micro_batch: Optional[int] = None) -> bool:
        """The trainer takes the batch and its step's peak is within ``capacity`` bytes."""
        return self.runs(batch_size, micro_batch) and self.step(batch_size, micro_batch).peak_bytes <= capacity

    def smallest_batch(self, micro: bool = False) -> int:
        """2 where batch norm normalizes over the (micro-)batch, or KoLeo needs a neighbour
        in the batch (DINOv2; computed on the whole batch's outputs with micro-batches)."""
        two = ("swav", "barlow", "simclr") if micro else ("swav", "barlow", "simclr", "dinov2")
        return 2 if self.config.method in two else 1

    def max_batch(self, capacity: float, limit: int = 1 << 16) -> int:
        """The largest batch whose step fits ``capacity`` bytes (0: not even the smallest).
        Peak memory grows with the batch nearly linearly, so each size tried is where the
        line through two sizes already run reaches the capacity (bisection if that stalls)."""
        smallest = self.smallest_batch()
        if not self.fits(capacity, smallest):
            return 0
        low, high = smallest, None
        size = min(max(self.config.batch_size, smallest + 1), limit)
        while high is None:  # bracket: low fits, high does not
            if not self.fits(capacity, size):
                high = size
            elif size == limit:
                return limit
            else:
                low = size
                size = min(limit, max(low + 1, self._crossing(smallest, low, capacity) + 1))
        for attempt in range(64):
            if high - low <= 1:
                break
            guess = self._crossing(low, high, capacity) if attempt < 4 else (low + high) // 2
            size = min(high - 1, max(low + 1, guess))
            if self.fits(capacity, size):
                low = size
            else:
                high = size
        return low

    def _crossing(self, a: int, b: int, capacity: float) -> int:
        """The batch where the line through the peaks at batches ``a`` and ``b`` reaches ``capacity``
        (their middle where the trainer refused one of them)."""
        if not (self.runs(a) and self.runs(b)):
            return (a + b) // 2
        peak_a, peak_b = self.step(a).peak_bytes, self.step(b).peak_bytes
        if peak_b <= peak_a:
            return 2 * b
        return int(a + (capacity - peak_a) * (b - a) / (peak_b - peak_a))

    def micro_batch_for(self, capacity: float, batch_size: int) -> Optional[int]:
        """The largest micro-batch (a divisor of ``batch_size``) whose step fits; None if none does."""
        if self.fits(capacity, batch_size):
            return batch_size
        smallest = self.smallest_batch(micro=True)
        divisors = [m for m in range(smallest, batch_size) if batch_size % m == 0]
        low, high = -1, len(divisors)  # divisors[low] fits, divisors[high] does not
        while high - low > 1:
            middle = (low + high) // 2
            if self.fits(capacity, batch_size, divisors[middle]):
                low = middle
            else:
                high = middle
        return divisors[low] if low >= 0 else None


def component_report(step: StepPlan, throughput: Throughput) -> dict[str, dict]:
    """Per component: FLOPs, bytes, modeled milliseconds, share of the step and the bound on
    the step's speed-up if that component cost nothing (Amdahl: 1 / (1 - share))."""
    seconds = step.seconds(throughput)
    total = sum(seconds.values())
    report = {}
    for component in COMPONENTS:
        flops, moved = step.totals(component)
        share = seconds[component] / total if total else 0.0
        report[component] = {"flops": flops, "bytes": moved, "model_ms": 1e3 * seconds[component], "share": share,
                             "speedup_bound": 1.0 / (1.0 - share) if share < 1 else math.inf}
    return report


def step_report(step: StepPlan, throughput: Throughput) -> dict:
    """A step's memory (peak, categories, activations by component) and work per component."""
    return {"peak_bytes": step.peak_bytes, "categories": step.categories,
            "activations_by_component": step.activations, "components": component_report(step, throughput)}


PATHS = {"kernels_off": False, "kernels_on": True}


def plan(config: TrainConfig, gpu: str, memory_gb: Optional[float] = None, paths=tuple(PATHS)) -> dict:
    """The plan of ``config``'s step on one ``gpu`` (a name of :data:`fastssl.devices.TARGETS`),
    with kernels off (the original ops) and on: one JSON-ready object."""
    if gpu not in TARGETS or gpu not in THROUGHPUT:
        raise ValueError(f"unknown GPU {gpu!r}; expected one of {', '.join(THROUGHPUT)}")
    memory_gb = TARGETS[gpu].memory_gb if memory_gb is None else memory_gb
    if memory_gb <= 0:
        raise ValueError(f"the GPU's memory must be positive, got {memory_gb} GB")
    capacity = usable_bytes(memory_gb)
    dtype = autocast_dtype(gpu) if config.amp else None
    result = {
        "model": "predicted on the meta device (no GPU ran it): allocations of the step's ops, FLOPs, bytes",
        "method": config.method, "arch": config.arch, "batch_size": config.batch_size,
        "micro_batch": config.micro_batch, "gpu": gpu, "memory_gb": memory_gb, "usable_bytes": int(capacity),
        "allocator_margin": f"{1 - ALLOCATOR_SHARE:.0%} of the memory after {CONTEXT_BYTES / GB:.0f} GB for the "
                            "CUDA context and library workspaces",
        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
    }
    sample = sample_metadata(config)
    for path in paths:
        model = StepModel(config, PATHS[path], dtype, sample, gpu)
        step = model.step(config.batch_size, config.micro_batch)
        largest = model.max_batch(capacity)
        result[path] = {
            **step_report(step, THROUGHPUT[gpu]),
            "fits": step.peak_bytes <= capacity,
            "max_batch_per_gpu": largest,
            # a micro-batch step holds at least what a batch of that size does
            "micro_batch_needed": model.micro_batch_for(capacity, config.batch_size) if largest else None,
            "flops": sum(step.totals(c)[0] for c in COMPONENTS),
        }
    return result


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def format_plan(result: dict) -> str:
    """The plan as text: memory by category, what fits, the work by component."""
    lines = [f"fastssl plan: {result['method']} ({result['arch']}), batch {result['batch_size']} per GPU"
             f"{'' if result['micro_batch'] is None else ', micro-batches of ' + str(result['micro_batch'])}, "
             f"on {result['gpu']} ({result['memory_gb']:g} GB, {result['dtype']} autocast)",
             f"A model, not a measurement: {result['model']}.",
             f"Usable: {_gb(result['usable_bytes'])} ({result['allocator_margin']}).", ""]
    paths = [path for path in PATHS if path in result]
    header = f"{'':<28}" + "".join(f"{path.replace('_', ' '):>16}" for path in paths)
    lines += [header, "peak memory by category"]
    for category in CATEGORIES:
        lines.append(f"  {category:<26}" + "".join(f"{_gb(result[p]['categories'][category]):>16}" for p in paths))
        if category == "activations":
            for component in COMPONENTS:
                lines.append(f"    {'saved by ' + component:<24}" +
                             "".join(f"{_gb(result[p]['activations_by_component'][component]):>16}" for p in paths))
    lines.append(f"  {'peak':<26}" + "".join(f"{_gb(result[p]['peak_bytes']):>16}" for p in paths))
    lines.append(f"  {'fits':<26}" + "".join(f"{'yes' if result[p]['fits'] else 'no':>16}" for p in paths))
    lines.append(f"{'largest batch per GPU':<28}" + "".join(f"{result[p]['max_batch_per_gpu']:>16}" for p in paths))
    lines.append(f"{'micro-batch for this batch':<28}" +
                 "".join(f"{str(result[p]['micro_batch_needed'] or 'none fits'):>16}" for p in paths))
    lines.append(f"{'TFLOP per step':<28}" + "".join(f"{result[p]['flops'] / 1e12:>16.2f}" for p in paths))
    lines += ["", "work by component (modeled time: each op at its roofline on this GPU; share of the step; "
                  "speed-up bound if it cost nothing)"]
    for path in paths:
        lines.append(f"  {path.replace('_', ' ')}")
        for name, part in result[path]["components"].items():
            lines.append(f"    {name:<10} {part['flops'] / 1e12:>8.2f} TFLOP {part['bytes'] / GB:>9.1f} GB "
                         f"{part['model_ms']:>9.1f} ms {part['share']:>6.1%}  <= {part['speedup_bound']:.2f}x")
    return "\n".join(lines)
