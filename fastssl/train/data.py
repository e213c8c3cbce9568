"""Datasets, multi-crop augmentation and a resumable data order.

- :class:`ShapesDataset`: the built-in labeled dataset, drawn procedurally from a seed (no
  download): ten shape/texture classes, dark on light or light on dark, with random
  positions, sizes, rotations and noise. Only the shape carries the class, so a network must
  learn shape to classify well; a random network's features get about 42% by kNN.
- Multi-crop views (torchvision transforms v2) with the DINO/SwAV/BYOL photometric recipe.
- :class:`NeCoCrops`: crops that all contain one random anchor point, so that every pair
  overlaps, returned with their boxes for RoI-aligning the overlap.
- Data order and augmentation are functions of (seed, epoch, index) only: each sample draws
  its augmentation from its own seeded generator state, so a resumed run sees exactly the
  images the uninterrupted run would have, whatever the number of loader processes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the recipes use
SHAPE_CLASSES = ("disk", "square", "ring", "cross", "triangle", "stripes", "checkerboard", "dots", "x", "bars")


def _shape_masks(kind: int, u: torch.Tensor, v: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Foreground masks (n, H, W) of one class in centred, rotated, scaled coordinates u, v."""
    radius = torch.sqrt(u * u + v * v)
    name = SHAPE_CLASSES[kind]
    if name == "disk":
        return radius < 1.0
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) < 0.85
    if name == "ring":
        return (radius < 1.0) & (radius > 0.6)
    if name == "cross":
        return ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0))
    if name == "triangle":
        return (v > -0.7) & (v < 0.9 - 1.8 * u.abs())
    if name == "x":
        return ((u - v).abs() < 0.35) & (radius < 1.1) | ((u + v).abs() < 0.35) & (radius < 1.1)
    if name == "stripes":
        return torch.sin(frequency * u) > 0
    if name == "checkerboard":
        return (torch.sin(frequency * u) * torch.sin(frequency * v)) > 0
    if name == "dots":
        return (torch.cos(frequency * u) + torch.cos(frequency * v)) > 1.0
    return (torch.sin(frequency * u) > 0.3) & (v.abs() < 0.9)  # bars: short stripes in a band


def _random_colours(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background grey levels (n, 3, 1, 1): one dark (0.2 to 0.3) and one light
    (0.7 to 0.8), in random order. Grey, and alike across images, on purpose: a colour or a
    grey level of its own would identify an image in both of its views, and self-supervised
    methods would match views by it instead of by shape (with the grey levels and tints drawn
    freely, DINO's kNN accuracy fell below a random network's)."""
    dark = 0.2 + 0.1 * torch.rand(n, generator=generator)
    light = 0.7 + 0.1 * torch.rand(n, generator=generator)
    dark_on_light = torch.rand(n, generator=generator) < 0.5
    foreground = torch.where(dark_on_light, dark, light)
    background = torch.where(dark_on_light, light, dark)
    return foreground.view(n, 1, 1, 1).expand(n, 3, 1, 1), background.view(n, 1, 1, 1).expand(n, 3, 1, 1)


def draw_shapes(kind: int, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n uint8 images (n, 3, size, size) of class ``kind``."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    center = (torch.rand(n, 2, generator=generator) - 0.5) * 0.5
    scale = 0.45 + 0.3 * torch.rand(n, generator=generator)
    angle = (torch.rand(n, generator=generator) - 0.5) * (math.pi / 4)
    frequency = 5.0 + 4.0 * torch.rand(n, generator=generator)
    dx = x[None] - center[:, 0, None, None]
    dy = y[None] - center[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / scale[:, None, None]
    v = (-sin * dx + cos * dy) / scale[:, None, None]
    mask = _shape_masks(kind, u, v, frequency[:, None, None]).unsqueeze(1).float()
    foreground, background = _random_colours(n, generator)
    images = mask * foreground + (1 - mask) * background
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class ShapesDataset(Dataset):
    """The built-in dataset: ``images_per_class`` images of each of the 10 classes, fully
    determined by ``seed`` and ``split`` ("train" or "test": disjoint draws). Items are
    (uint8 image tensor (3, size, size), label)."""

    classes = SHAPE_CLASSES

    def __init__(self, split: str = "train", images_per_class: int = 500, size: int = 32, seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        self.images = torch.cat([draw_shapes(k, images_per_class, size, generator) for k in range(len(self.classes))])
        self.targets = torch.arange(len(self.classes)).repeat_interleave(images_per_class).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def open_image_folder(root: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(root)


def _to_normalized_float() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def photometric(blur_probability: float, solarize_probability: float, crop_size: int, hue: float = 0.1,
                intensity: float = 0.4, invert_probability: float = 0.0) -> v2.Compose:
    """Colour jitter, grayscale, blur, solarize: the DINO/BYOL recipe (the flip is geometric, so apart).
    ``hue`` 0 skips the hue shift, by far the slowest transform on the CPU; ``intensity`` is the
    brightness and contrast jitter; ``invert_probability`` > 0 adds a random inversion, so that two
    views do not share their grey levels (on grey images a shortcut that ignores shape)."""
    kernel = max(3, (crop_size // 10) | 1)  # about 10% of the crop, odd
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(intensity, intensity, 0.2, hue)], p=0.8),
        *([v2.RandomInvert(p=invert_probability)] if invert_probability > 0 else []),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_probability),
        v2.RandomSolarize(threshold=128, p=solarize_probability),
    ])


class MultiCropAugmentation:
    """Image -> [global_1, global_2, local_1, ..., local_n] float tensors (DINO/SwAV multi-crop)."""

    def __init__(self, global_size: int, local_size: int, local_crops: int, global_scale, local_scale,
                 hue: float = 0.1, intensity: float = 0.4, invert_probability: float = 0.0):
        def view(size, scale, blur, solarize):
            return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                               v2.RandomHorizontalFlip(),
                               photometric(blur, solarize, size, hue, intensity, invert_probability),
                               *_to_normalized_float()])

        self.global_views = [view(global_size, global_scale, 1.0, 0.0), view(global_size, global_scale, 0.1, 0.2)]
        self.local_view = view(local_size, local_scale, 0.5, 0.0)
        self.local_crops = local_crops

    def __call__(self, image) -> list[torch.Tensor]:
        return [view(image) for view in self.global_views] + [self.local_view(image) for _ in range(self.local_crops)]


def block_mask(grid: int, patches: int) -> torch.Tensor:
    """A (grid * grid,) bool mask of about ``patches`` patches in rectangles, as DINOv2's
    masking generator draws them: each rectangle covers 4 or more patches (up to what is still
    to mask), with an aspect ratio log-uniform in [0.3, 1 / 0.3] and sides shorter than the
    grid; rectangles are added until the count is reached or ten tries in a row add nothing."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    misses = 0
    while int(mask.sum()) < patches and misses < 10:
        budget = patches - int(mask.sum())
        area = random_uniform(min(4, budget), budget)
        aspect = math.exp(random_uniform(math.log(0.3), -math.log(0.3)))
        height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (1 <= height < grid and 1 <= width < grid):
            misses += 1
            continue
        top = int(torch.randint(grid - height + 1, ()))
        left = int(torch.randint(grid - width + 1, ()))
        added = int((~mask[top:top + height, left:left + width]).sum())
        if 0 < added <= budget:
            mask[top:top + height, left:left + width] = True
            misses = 0
        else:
            misses += 1
    return mask.flatten()


class MaskedGlobalCrops:
    """DINOv2's student input: a multi-crop augmentation whose global crops each get a block
    mask of their patches with probability ``probability``, the masked share uniform in
    ``ratio`` (DINOv2 spreads the same ratios evenly over a batch; here each image draws one).
    Image -> (crops, (2, patches) bool masks)."""

    def __init__(self, augmentation: MultiCropAugmentation, grid: int, ratio: tuple, probability: float):
        self.augmentation, self.grid, self.ratio, self.probability = augmentation, grid, tuple(ratio), probability

    def __call__(self, image):
        crops = self.augmentation(image)
        masks = [block_mask(self.grid, int(self.grid ** 2 * random_uniform(*self.ratio)))
                 if random_uniform(0, 1) < self.probability else torch.zeros(self.grid ** 2, dtype=torch.bool)
                 for _ in range(2)]
        return crops, torch.stack(masks)


def collate_masked_crops(samples: Sequence):
    """-> (one (B, 3, H, W) tensor per crop index, (2B, patches) masks crop-major)."""
    crops, masks = zip(*samples)
    return collate_crops(crops), torch.cat(torch.stack(masks).unbind(1))


def sample_box_containing(width: int, height: int, anchor: tuple[float, float], scale, ratio=(3 / 4, 4 / 3)):
    """A RandomResizedCrop-like box (x1, y1, x2, y2) in pixels that contains ``anchor``."""
    area = width * height * random_uniform(*scale)
    aspect = math.exp(random_uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w = min(width, max(1.0, math.sqrt(area * aspect)))
    box_h = min(height, max(1.0, math.sqrt(area / aspect)))
    ax, ay = anchor
    x1 = random_uniform(max(0.0, ax - box_w), min(width - box_w, ax))
    y1 = random_uniform(max(0.0, ay - box_h), min(height - box_h, ay))
    return x1, y1, x1 + box_w, y1 + box_h


def random_uniform(low: float, high: float) -> float:
    """A uniform draw from torch's generator (the one each sample seeds)."""
    return low + (high - low) * float(torch.rand(()))


@dataclass
class NeCoView:
    image: torch.Tensor
    box: torch.Tensor  # (x1, y1, x2, y2) in the source image's pixels
    flipped: bool


class NeCoCrops:
    """Image -> (crops, boxes (n, 4), flipped (n,)): 2 global and ``local_crops`` local crops
    that all contain one random anchor point, so every pair of crops overlaps."""

    def __init__(self, global_size: int, local_size: int, local_crops: int, global_scale, local_scale):
        self.sizes = [global_size] * 2 + [local_size] * local_crops
        self.scales = [tuple(global_scale)] * 2 + [tuple(local_scale)] * local_crops
        self.to_image = v2.ToImage()
        self.styles = [photometric(1.0, 0.0, global_size), photometric(0.1, 0.2, global_size)] + \
            [photometric(0.5, 0.0, local_size)] * local_crops
        self.finish = v2.Compose(_to_normalized_float())

    def __call__(self, image):
        image = self.to_image(image)
        height, width = image.shape[-2:]
        anchor = (random_uniform(0, width), random_uniform(0, height))
        views = [self._view(image, size, scale, style, anchor)
                 for size, scale, style in zip(self.sizes, self.scales, self.styles)]
        return ([view.image for view in views], torch.stack([view.box for view in views]),
                torch.tensor([view.flipped for view in views]))

    def _view(self, image, size, scale, style, anchor) -> NeCoView:
        x1, y1, x2, y2 = sample_box_containing(image.shape[-1], image.shape[-2], anchor, scale)
        crop = v2.functional.resized_crop(image, int(y1), int(x1), max(1, round(y2 - y1)), max(1, round(x2 - x1)),
                                          [size, size], antialias=True)
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            crop = v2.functional.horizontal_flip(crop)
        # The box actually cropped (integer pixels), so the overlap geometry is exact.
        box = torch.tensor([int(x1), int(y1), int(x1) + max(1, round(x2 - x1)), int(y1) + max(1, round(y2 - y1))],
                           dtype=torch.float32)
        return NeCoView(self.finish(style(crop)), box, flipped)


def evaluation_transform(size: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), *_to_normalized_float()])


class SeededViews(Dataset):
    """Items are ``(epoch, index)``; the augmentation of each draws from torch's generator
    seeded by (seed, epoch, index), inside a forked RNG so the caller's state is untouched."""

    def __init__(self, base: Dataset, augment: Callable, seed: int):
        self.base, self.augment, self.seed = base, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        image, _ = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
            return self.augment(image)


def epoch_order(dataset_size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of an epoch, a function of (seed, epoch) only."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def rank_batches(dataset_size: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 first_step: int = 0) -> list[list[tuple[int, int]]]:
    """This process's batches of ``(epoch, index)`` for an epoch, from ``first_step`` on:
    each global batch of ``batch_size`` is split into equal contiguous shares."""
    order = epoch_order(dataset_size, seed, epoch)
    per_rank = batch_size // world_size
    steps = dataset_size // batch_size
    return [[(epoch, i) for i in order[step * batch_size + rank * per_rank: step * batch_size + (rank + 1) * per_rank]]
            for step in range(first_step, steps)]


def collate_crops(samples: Sequence) -> list[torch.Tensor]:
    """[per-sample crop lists] -> one (B, 3, H, W) tensor per crop index."""
    return [torch.stack(crops) for crops in zip(*samples)]


def collate_neco(samples: Sequence):
    crops, boxes, flipped = zip(*samples)
    return collate_crops(crops), torch.stack(boxes), torch.stack(flipped)


def epoch_loader(views: SeededViews, batches: list, workers: int, collate: Callable) -> DataLoader:
    # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG when
    # an epoch starts, so a run resumed mid-epoch would draw at a different point.
    return DataLoader(views, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator(), pin_memory=torch.cuda.is_available())


def seed_python_and_numpy(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
