"""Reference trainers for DINO, DINOv2, SwAV, Barlow Twins, SimCLR and NeCo on fastssl.nn.

``fastssl train {dino,dinov2,swav,barlow,simclr,neco} ...`` (or ``python -m fastssl.train``), or from Python::

    from fastssl.train import resolve_config, train
    result = train(resolve_config("dino", preset="tiny", output_dir="runs/dino-tiny"))

``--kernels on`` (default) uses fastssl's modules and the packed multi-crop ViT forward;
``--kernels off`` runs the original ops (per-resolution forwards with SDPA, the original
losses, diffsort-style sorting): the baseline of the GPU-hour benchmark.
"""

from fastssl.train.config import METHODS, PRESETS, TrainConfig, resolve_config


def __getattr__(name: str):
    # The loop imports torchvision and timm: loaded on first use, so ``fastssl info`` stays quick.
    if name in ("train", "TrainResult"):
        from fastssl.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'fastssl.train' has no attribute {name!r}")


__all__ = ["METHODS", "PRESETS", "TrainConfig", "TrainResult", "resolve_config", "train"]
