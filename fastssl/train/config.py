"""Training configuration: one dataclass, per-method defaults, presets and validation.

Values resolve in this order: the dataclass defaults, then the method's defaults
(:data:`METHOD_DEFAULTS`, the original recipes scaled to the built-in data), then a preset
(:data:`PRESETS`), then what the user sets explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

METHODS = ("dino", "dinov2", "swav", "barlow", "simclr", "neco")
VIT_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}  # dim, heads
VIT_ARCH = re.compile(r"^vit_(tiny|small|base|large)(?:_patch(\d+))?(?:_reg(\d+))?$")
RESNET_ARCHS = ("resnet18", "resnet50")


@dataclass
class TrainConfig:
    method: str = "dino"
    # data
    data: Optional[str] = field(default=None, metadata={"help": "ImageFolder root (default: the built-in dataset)"})
    image_size: int = field(default=32, metadata={"help": "side of the built-in dataset's images"})
    train_images_per_class: int = 500
    test_images_per_class: int = 100
    workers: int = field(default=2, metadata={"help": "data loader processes (0: load in the training process)"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    # crops
    global_crop_size: int = 224
    local_crop_size: int = 96
    local_crops: int = 8
    global_crop_scale: tuple = (0.4, 1.0)
    local_crop_scale: tuple = (0.05, 0.4)
    hue: float = field(default=0.1, metadata={"help": "colour jitter's hue shift (0: none; the slowest CPU transform)"})
    intensity_jitter: float = field(default=0.4, metadata={"help": "colour jitter's brightness and contrast"})
    invert_probability: float = field(default=0.0, metadata={"help": "probability of inverting a view's intensities"})
    # model
    arch: str = field(default="vit_small_patch16", metadata={
        "help": "vit_{tiny,small,base,large}[_patchN][_regN] (timm) or resnet18/resnet50 (torchvision)"})
    depth: int = field(default=12, metadata={"help": "ViT blocks"})
    drop_path: float = 0.1
    checkpoint_blocks: bool = field(default=False, metadata={
        "help": "ViTs: recompute each block in backward instead of keeping its activations (the activations "
                "of one block at a time, for one more forward of the blocks; fastssl plan shows the memory)"})
    layer_scale: float = field(default=0.0, metadata={"help": "ViT LayerScale's initial value (0: no LayerScale)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "backbone checkpoint path (NeCo: DINOv2 ViT)"})
    out_dim: int = field(default=65536, metadata={"help": "DINO prototypes / SwAV prototypes / Barlow projector"})
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    # optimization
    epochs: int = 100
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this step (schedules keep epochs)"})
    batch_size: int = field(default=64, metadata={"help": "global batch size, split over the processes"})
    micro_batch: Optional[int] = field(default=None, metadata={
        "help": "images per micro-batch on each process: the step runs in micro-batches and keeps the whole "
                "batch's loss (gradient caching: one more student forward; see README)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, lars or sgd"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate for a batch of 256 (scaled linearly)"})
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = field(default=3.0, metadata={"help": "gradient norm clip (0: off)"})
    # method-specific
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    freeze_last_layer_epochs: int = 1
    swav_queue_length: int = 0
    swav_epoch_queue_starts: int = 15
    swav_freeze_prototypes_steps: int = 313
    swav_epsilon: float = 0.05
    ibot_loss_weight: float = field(default=1.0, metadata={"help": "DINOv2: weight of the iBOT masked-patch loss"})
    koleo_loss_weight: float = field(default=0.1, metadata={"help": "DINOv2: weight of the KoLeo regularizer"})
    ibot_separate_head: bool = field(default=False, metadata={"help": "DINOv2: an iBOT head of its own"})
    centering: str = field(default="centering", metadata={
        "help": "DINOv2's teacher targets: centering (softmax of centered logits) or sinkhorn_knopp"})
    mask_probability: float = field(default=0.5, metadata={"help": "DINOv2: share of global crops masked"})
    mask_ratio: tuple = field(default=(0.1, 0.5), metadata={"help": "DINOv2: masked share of a masked crop"})
    barlow_lambda: float = 0.0051
    simclr_temperature: float = field(default=0.5, metadata={"help": "SimCLR: NT-Xent temperature"})
    neco_queue_size: int = 8192
    neco_aligned_side: int = field(default=7, metadata={"help": "NeCo RoI-aligns each overlap to side x side patches"})
    neco_steepness: float = 100.0
    neco_backbone_lr: float = field(default=4e-5, metadata={"help": "NeCo backbone lr for a batch of 256"})
    # execution
    kernels: bool = field(default=True, metadata={
        "help": "on: fastssl modules and the packed ViT forward; off: the original ops (the benchmark baseline)"})
    backend: Optional[str] = field(default=None, metadata={
        "help": "force a fastssl backend (default: each op's default for the device: triton or cuda on "
                "a GPU, cpp where an op has C++ kernels on the CPU, else reference)"})
    device: Optional[str] = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    amp: bool = field(default=True, metadata={"help": "16-bit autocast on a GPU: bf16, or fp16 with a gradient "
                                                     "scaler where the GPU lacks bf16 (T4, V100)"})
    fsdp: bool = field(default=False, metadata={"help": "shard the student and teacher with FSDP2 (fully_shard)"})
    seed: int = 0
    # operations
    output_dir: str = "runs/fastssl"
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints (0: only at the end)"})
    resume: bool = field(default=True, metadata={"help": "continue from output_dir/checkpoint.pt when it exists"})
    log_every: int = 10
    knn_every_epochs: int = field(default=0, metadata={"help": "kNN evaluation every N epochs (0: start and end)"})
    knn: bool = field(default=True, metadata={"help": "kNN accuracy of the features on the built-in held-out split"})
    knn_k: int = 20
    knn_temperature: float = 0.07
    progress: bool = True

    @property
    def is_vit(self) -> bool:
        return self.arch.startswith("vit_")

    def vit_spec(self) -> tuple[int, int, int, int]:
        """(embed_dim, heads, patch_size, registers) of a ``vit_*`` arch."""
        match = VIT_ARCH.match(self.arch)
        width, heads = VIT_WIDTHS[match.group(1)]
        return width, heads, int(match.group(2) or 16), int(match.group(3) or 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino": {},
    # DINOv2's ViT-L/14 recipe (ssl_default_config and vitl14 configs): layer scale, 10 crops.
    "dinov2": dict(arch="vit_large_patch14", depth=24, drop_path=0.4, layer_scale=1e-5, lr=4e-3, warmup_epochs=10,
                   min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.2, teacher_temp=0.07, warmup_teacher_temp=0.04,
                   warmup_teacher_temp_epochs=30, momentum_teacher=0.992, global_crop_size=224, local_crop_size=98,
                   global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), head_hidden_dim=2048),
    "swav": dict(arch="resnet50", optimizer="lars", lr=0.3, min_lr=3e-4, warmup_epochs=0, weight_decay=1e-6,
                 weight_decay_end=1e-6, clip_grad=0.0, out_dim=3000, head_bottleneck_dim=128, local_crops=6,
                 global_crop_scale=(0.14, 1.0), local_crop_scale=(0.05, 0.14), swav_queue_length=3840),
    "barlow": dict(arch="resnet50", optimizer="lars", lr=0.2, min_lr=2e-3, warmup_epochs=10, weight_decay=1.5e-6,
                   weight_decay_end=1.5e-6, clip_grad=0.0, out_dim=8192, head_hidden_dim=8192, local_crops=0,
                   global_crop_scale=(0.08, 1.0)),
    # SimCLR's ResNet-50 recipe (Chen et al. 2020): LARS, lr 0.3 per 256 images, weight decay 1e-6,
    # 10 warm-up epochs, projection 2048-128; tau 0.5 (lightly's default; SimCLR used 0.1 at batch 4096).
    "simclr": dict(arch="resnet50", optimizer="lars", lr=0.3, min_lr=0.0, warmup_epochs=10, weight_decay=1e-6,
                   weight_decay_end=1e-6, clip_grad=0.0, out_dim=128, head_hidden_dim=2048, local_crops=0,
                   global_crop_scale=(0.08, 1.0)),
    "neco": dict(arch="vit_small_patch14", epochs=25, lr=4e-4, neco_backbone_lr=4e-5, min_lr=4e-6, warmup_epochs=0,
                 weight_decay=0.04,
                 weight_decay_end=0.5, momentum_teacher=0.9995, global_crop_size=518, local_crop_size=98,
                 local_crops=4, global_crop_scale=(0.25, 1.0), local_crop_scale=(0.05, 0.25), drop_path=0.0,
                 head_bottleneck_dim=256, layer_scale=1e-5),
}

# Small enough to train on a laptop CPU in minutes, on the built-in 32-px dataset.
_TINY_CROPS = dict(image_size=32, global_crop_size=32, local_crop_size=16, epochs=4, batch_size=32, warmup_epochs=1,
                   train_images_per_class=200, checkpoint_every=100, knn_every_epochs=0, workers=1)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        # A sharp teacher (0.02) and mild crops: softer targets or harder crops collapse this
        # small network to a constant output within a few hundred steps.
        "dino": dict(_TINY_CROPS, arch="vit_tiny_patch8", depth=4, drop_path=0.0, out_dim=1024, head_hidden_dim=512,
                     head_bottleneck_dim=128, local_crops=4, epochs=6, lr=2e-3, teacher_temp=0.02,
                     warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0, momentum_teacher=0.996,
                     global_crop_scale=(0.5, 1.0), local_crop_scale=(0.25, 0.5), weight_decay_end=0.1, hue=0.0,
                     workers=0),
        # DINO's tiny preset with DINOv2's additions: layer scale, masked global crops, iBOT, KoLeo.
        # LayerScale starts at 1, not DINOv2's 1e-5: from 1e-5 a randomly initialized network
        # gives every image nearly the same features (random-init kNN at chance), the centered
        # targets are uniform and this short run never leaves them.
        "dinov2": dict(_TINY_CROPS, arch="vit_tiny_patch8", depth=4, drop_path=0.0, out_dim=1024, layer_scale=1.0,
                       head_hidden_dim=512, head_bottleneck_dim=128, local_crops=4, epochs=6, lr=2e-3,
                       teacher_temp=0.02, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0,
                       momentum_teacher=0.996, global_crop_scale=(0.5, 1.0), local_crop_scale=(0.25, 0.5),
                       weight_decay_end=0.1, hue=0.0, workers=0),
        # Few prototypes in a 32-d embedding, a queue from the second epoch and a higher lr: with
        # 100 prototypes in 256-d and no queue the predictions stayed uniform (kNN +2 points).
        "swav": dict(_TINY_CROPS, arch="resnet18", out_dim=30, head_hidden_dim=512, head_bottleneck_dim=32,
                     local_crops=2, epochs=3, lr=0.6, swav_queue_length=256, swav_epoch_queue_starts=1,
                     swav_freeze_prototypes_steps=50, global_crop_scale=(0.35, 1.0), local_crop_scale=(0.1, 0.35)),
        "barlow": dict(_TINY_CROPS, arch="resnet18", out_dim=512, head_hidden_dim=512, lr=0.2, epochs=2,
                       global_crop_scale=(0.3, 1.0)),
        # A lower temperature than SimCLR's 0.5: 63 negatives per row at batch 32, not 8191.
        "simclr": dict(_TINY_CROPS, arch="resnet18", out_dim=128, head_hidden_dim=512, lr=0.3, epochs=3,
                       simclr_temperature=0.2, global_crop_scale=(0.3, 1.0)),
        # From scratch, not from a DINOv2 checkpoint as NeCo's recipe: the backbone at the head's
        # lr and a faster teacher (0.99; NeCo's 0.9995 moves it 12% of the way in 248 steps).
        "neco": dict(_TINY_CROPS, arch="vit_tiny_patch8", depth=4, layer_scale=1.0, global_crop_size=32,
                     local_crop_size=16, local_crops=2, head_hidden_dim=256, head_bottleneck_dim=64,
                     neco_queue_size=1024, neco_steepness=20.0, lr=5e-3, neco_backbone_lr=5e-3,
                     momentum_teacher=0.99),
    },
}


# Each numeric option's valid range: (lowest, highest), None for no limit, and whether the
# lowest value itself is allowed. validate() names the option and the range in one line.
NUMERIC_RANGES: dict[str, tuple[Optional[float], Optional[float], bool]] = {
    **{name: (1, None, True) for name in (
        "image_size", "train_images_per_class", "test_images_per_class", "threads", "global_crop_size",
        "local_crop_size", "depth", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "epochs", "max_steps",
        "batch_size", "micro_batch", "log_every", "knn_k")},
    **{name: (0, None, True) for name in (
        "workers", "local_crops", "intensity_jitter", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
        "clip_grad", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "swav_queue_length",
        "swav_epoch_queue_starts", "swav_freeze_prototypes_steps", "barlow_lambda", "neco_queue_size",
        "neco_backbone_lr", "checkpoint_every", "knn_every_epochs")},
    **{name: (0, None, False) for name in (
        "lr", "teacher_temp", "warmup_teacher_temp", "swav_epsilon", "simclr_temperature", "neco_steepness",
        "knn_temperature")},
    "hue": (0, 0.5, True), "layer_scale": (0, None, True), "invert_probability": (0, 1, True),
    "drop_path": (0, 1, True),
    "ibot_loss_weight": (0, None, True), "koleo_loss_weight": (0, None, True), "mask_probability": (0, 1, True),
    "momentum_teacher": (0, 1, True), "neco_aligned_side": (2, None, True),
}


def _check_ranges(config: TrainConfig) -> None:
    for name, (lowest, highest, lowest_allowed) in NUMERIC_RANGES.items():
        value = getattr(config, name)
        if value is None:
            continue
        too_low = lowest is not None and (value < lowest or (value == lowest and not lowest_allowed))
        if too_low or (highest is not None and value > highest):
            low = "" if lowest is None else f"{'>=' if lowest_allowed else '>'} {lowest}"
            high = "" if highest is None else f"<= {highest}"
            raise ValueError(f"--{name.replace('_', '-')} must be {' and '.join(filter(None, (low, high)))}, "
                             f"got {value}")
    low, high = config.mask_ratio
    if not 0 <= low <= high <= 1:
        raise ValueError(f"--mask-ratio must be two fractions 0 <= min <= max <= 1, got {low} {high}")
    for name in ("global_crop_scale", "local_crop_scale"):
        low, high = getattr(config, name)
        if not 0 < low <= high <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be two fractions 0 < min <= max <= 1, got {low} {high}")


def resolve_config(method: str, preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """The config of ``method``: its defaults, then ``preset``, then ``overrides``; validated."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    values = dict(METHOD_DEFAULTS[method])
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset][method])
    values.update({key: value for key, value in overrides.items() if value is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    config = TrainConfig(method=method, **values)
    validate(config)
    return config


def validate(config: TrainConfig, world_size: int = 1) -> None:
    """Raise ValueError with a clear message for configurations that cannot train."""
    _check_ranges(config)
    if config.is_vit:
        if not VIT_ARCH.match(config.arch):
            raise ValueError(f"unknown ViT arch {config.arch!r}; expected "
                             "vit_{tiny,small,base,large}[_patchN][_regN], e.g. vit_small_patch14_reg4")
    elif config.arch not in RESNET_ARCHS:
        raise ValueError(f"unknown arch {config.arch!r}; expected vit_{{tiny,small,base,large}}[_patchN][_regN] "
                         f"or one of {', '.join(RESNET_ARCHS)}")
    elif config.checkpoint_blocks:
        raise ValueError(f"--checkpoint-blocks recomputes ViT blocks; {config.arch} is a ResNet")
    if config.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"--centering must be centering or sinkhorn_knopp, got {config.centering!r}")
    if config.method in ("dino", "dinov2", "neco") and not config.is_vit:
        raise ValueError(f"{config.method} trains a ViT; got arch {config.arch!r}")
    if config.data is not None and not os.path.isdir(config.data):
        raise ValueError(f"--data {config.data!r} is not a directory (expected an ImageFolder root: one "
                         "sub-directory of images per class)")
    if config.pretrained is not None and not os.path.isfile(config.pretrained):
        raise ValueError(f"--pretrained {config.pretrained!r} does not exist")
    if config.batch_size < world_size:
        raise ValueError(f"--batch-size {config.batch_size} is smaller than the {world_size} processes: every "
                         "process needs at least one image")
    if config.batch_size % world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world_size} processes")
    if config.method in ("swav", "barlow", "simclr") and config.batch_size // world_size < 2:
        raise ValueError(f"{config.method} normalizes over the batch: use at least 2 images per process")
    per_process = config.batch_size // world_size
    if config.micro_batch is not None and per_process % config.micro_batch:
        raise ValueError(f"--micro-batch {config.micro_batch} must divide the {per_process} images of each "
                         f"process's batch (--batch-size {config.batch_size} over {world_size} processes)")
    queue_rows = config.swav_queue_length // world_size
    if config.method == "swav" and 0 < queue_rows < per_process:
        raise ValueError(f"--swav-queue-length {config.swav_queue_length} holds {queue_rows} rows per process, fewer "
                         f"than its {per_process} images per step: use a longer queue")
    if config.method in ("swav", "barlow", "simclr") and config.micro_batch == 1:
        raise ValueError(f"{config.method}'s network normalizes over the micro-batch: use --micro-batch 2 or more")
    if config.optimizer not in ("adamw", "lars", "sgd"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}; expected adamw, lars or sgd")
    if config.method in ("barlow", "simclr") and config.local_crops:
        raise ValueError(f"{config.method} uses two crops: set --local-crops 0")
