"""DINOv2 (Oquab et al., 2023): DINO's self-distillation of the CLS token, iBOT's masked-patch
distillation and the KoLeo regularizer, as facebookresearch/dinov2's training step computes
them (its ``ssl_meta_arch.forward_backward``), on fastssl's modules.

Per step, with B images, 2 global crops and L local crops:

- teacher (EMA, no gradient), global crops only, unmasked: CLS tokens with the two crops
  swapped (so each student global crop meets the other one), through the DINO head; the
  patch tokens at the student's masked positions through the iBOT head (the DINO head when
  shared); targets by centering (``softmax_center_teacher`` then ``update_center``, the
  center's all-reduce applied at the next step) or by Sinkhorn-Knopp;
- student: global crops with block masks (a share ``mask_probability`` of them, each masking
  ``mask_ratio`` of its patches) and local crops in one packed forward;
- loss = DINO over the local crops (each against both teacher crops) and over the global
  crops (each against the other), divided by the 2 + 2L terms; + KoLeo on each global crop's
  CLS tokens; + iBOT on the masked patches (each weighted by 1 / the masked patches of its
  image, averaged over the images and the two crops).

With kernels off the same losses run on fastssl's reference backend (plain PyTorch) and the
ViT runs one forward per resolution.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.profiler import record_function

import fastssl
from fastssl.accumulate import split_batch
from fastssl.integrations.dinov2 import DINOLoss, KoLeoLoss, iBOTPatchLoss
from fastssl.nn import DINOHead
from fastssl.nn.dino import teacher_temperature_schedule
from fastssl.profiling import LOSS
from fastssl.train.config import TrainConfig
from fastssl.train.data import MaskedGlobalCrops, collate_masked_crops
from fastssl.train.method import COLLAPSE_SAMPLE_ROWS, Method, at_least_float32
from fastssl.train.models import MultiCropBackbone, build_backbone, crop_groups, make_teacher, unwrap


class DINOv2Network(nn.Module):
    """Backbone (a ViT with a mask token), DINO head and, when separate, iBOT head."""

    def __init__(self, backbone: MultiCropBackbone, config: TrainConfig):
        super().__init__()
        width = backbone.backbone.embed_dim

        def head():
            return DINOHead(width, config.out_dim, hidden_dim=config.head_hidden_dim,
                            bottleneck_dim=config.head_bottleneck_dim, norm_last_layer=True)

        self.backbone, self.dino_head = backbone, head()
        self.ibot_head = head() if config.ibot_separate_head else self.dino_head

    def forward(self, crops: list[torch.Tensor], masks=None):
        """-> (CLS tokens (crops * B, C) crop-major, patch tokens of the first group (2B, n, C))."""
        groups = crop_groups(crops)
        tokens = self.backbone(groups, None if masks is None else [masks] + [None] * (len(groups) - 1))
        prefix = self.backbone.prefix_tokens
        return torch.cat([group[:, 0] for group in tokens]), tokens[0][:, prefix:]


class DINOv2(Method):
    def __init__(self, config: TrainConfig, kernels: bool):
        super().__init__(config, kernels)
        self.student = DINOv2Network(build_backbone(config, packed=kernels), config)
        self.teacher = make_teacher(self.student)
        self.loss_module = nn.ModuleDict(dict(dino=DINOLoss(config.out_dim), ibot=iBOTPatchLoss(config.out_dim),
                                              koleo=KoLeoLoss()))
        self._targets_sample = None
        self.teacher_temperatures = teacher_temperature_schedule(
            config.warmup_teacher_temp, config.teacher_temp, min(config.warmup_teacher_temp_epochs, config.epochs),
            config.epochs)

    def augmentation(self):
        patch_size = self.config.vit_spec()[2]
        return MaskedGlobalCrops(super().augmentation(), self.config.global_crop_size // patch_size,
                                 self.config.mask_ratio, self.config.mask_probability)

    collate = staticmethod(collate_masked_crops)

    def _losses_backend(self):
        """Kernels off: the same losses in plain PyTorch (fastssl's reference backend)."""
        return contextlib.nullcontext() if self.kernels else fastssl.use_backend("reference")

    def split(self, batch, micro_batch_size):
        crops, masks = batch  # masks: (2B, patches) crop-major, split as (2, B, patches)
        parts = zip(split_batch(crops, micro_batch_size), split_batch(masks.unflatten(0, (2, -1)).transpose(0, 1),
                                                                      micro_batch_size))
        return [(micro_crops, micro_masks.transpose(0, 1).flatten(0, 1)) for micro_crops, micro_masks in parts]

    def join(self, parts, micro_batches):
        """CLS rows crop-major as the other methods; the masked patches' rows (the last output)
        put back in the whole batch's order: crop, image, patch."""
        *rows, masked = zip(*parts)
        joined = super().join([tuple(part) for part in zip(*rows)], micro_batches)
        images = sum(len(masks) // 2 for _, masks in micro_batches)
        places, first_image = [], 0
        for _, masks in micro_batches:  # each masked row's place in the whole batch
            crop, image, patch = masks.unflatten(0, (2, -1)).nonzero().unbind(1)
            places.append((crop * images + first_image + image) * masks.shape[1] + patch)
            first_image += len(masks) // 2
        return (*joined, torch.cat(masked)[torch.cat(places).argsort()])

    def student_outputs(self, student, batch):
        """(CLS tokens, their DINO head's outputs, the iBOT head's outputs of the masked patches)."""
        crops, masks = batch
        student_cls, student_patches = student(crops, masks)
        network = unwrap(student)
        masked = masks.flatten().nonzero().flatten()
        return (student_cls, at_least_float32(network.dino_head(student_cls)),
                at_least_float32(network.ibot_head(student_patches.flatten(0, 1)[masked])))

    @torch.no_grad()
    def teacher_outputs(self, batch):
        """(The DINO head's outputs of the global crops' CLS tokens, crops swapped; the iBOT
        head's of the patches the student masks)."""
        crops, masks = batch
        teacher_cls, teacher_patches = self.teacher(crops[:2])
        teacher_cls = torch.cat(teacher_cls.chunk(2)[::-1])  # crop A's student meets crop B's teacher
        masked = masks.flatten().nonzero().flatten()
        return (at_least_float32(self.teacher.dino_head(teacher_cls)),
                at_least_float32(self.teacher.ibot_head(teacher_patches.flatten(0, 1)[masked])))

    def loss_from(self, student_outputs, teacher_outputs, batch, epoch, step):
        crops, masks = batch
        config, losses = self.config, self.loss_module
        student_cls, dino_outputs, ibot_outputs = student_outputs
        dino_logits, ibot_logits = teacher_outputs
        batch_size, local_crops = crops[0].shape[0], len(crops) - 2
        with torch.no_grad(), self._losses_backend():
            dino_targets, ibot_targets = self._teacher_targets(dino_logits, ibot_logits,
                                                               self.teacher_temperature(epoch))
        self._targets_sample = dino_targets[:COLLAPSE_SAMPLE_ROWS]
        global_outputs, local_outputs = dino_outputs[:2 * batch_size], dino_outputs[2 * batch_size:]
        terms = 2 + 2 * local_crops
        with record_function(LOSS), self._losses_backend():
            loss = 2 * losses["dino"]([global_outputs], [dino_targets]) / terms
            if local_crops:
                loss = loss + losses["dino"](list(local_outputs.chunk(local_crops)),
                                             list(dino_targets.chunk(2))) / terms
            loss = loss + config.koleo_loss_weight * sum(
                losses["koleo"](cls) for cls in at_least_float32(student_cls[:2 * batch_size]).chunk(2))
            if len(ibot_outputs):  # iBOT: averaged over the two global crops, as DINOv2 scales it
                loss = loss + config.ibot_loss_weight * losses["ibot"].forward_masked(
                    ibot_outputs, ibot_targets, masks)
        return loss

    def _teacher_targets(self, dino_logits, ibot_logits, temperature):
        dino, ibot = self.loss_module["dino"], self.loss_module["ibot"]
        if self.config.centering == "sinkhorn_knopp":
            return (dino.sinkhorn_knopp_teacher(dino_logits, temperature),
                    ibot.sinkhorn_knopp_teacher(ibot_logits, temperature) if len(ibot_logits) else ibot_logits)
        dino_targets = dino.softmax_center_teacher(dino_logits, temperature)
        dino.update_center(dino_logits)
        ibot_targets = ibot_logits
        if len(ibot_logits):  # the iBOT center is (1, 1, K): DINOv2 passes the masked tokens as (1, n, K)
            ibot_targets = ibot.softmax_center_teacher(ibot_logits.unsqueeze(0), temperature)[0]
            ibot.update_center(ibot_logits.unsqueeze(0))
        return dino_targets, ibot_targets

    def teacher_temperature(self, epoch: int) -> float:
        return float(self.teacher_temperatures[epoch])

    def output_distribution(self, epoch):
        return self._targets_sample

    def after_backward(self, epoch, step):
        # As DINO: the prototypes stay fixed during the first epoch(s).
        if epoch < self.config.freeze_last_layer_epochs:
            network = unwrap(self.student)
            for head in {id(network.dino_head): network.dino_head, id(network.ibot_head): network.ibot_head}.values():
                for parameter in head.last_layer.parameters():
                    parameter.grad = None
