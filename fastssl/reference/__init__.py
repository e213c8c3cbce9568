"""Plain-PyTorch ground truth for every op: CPU fallback, test oracle, benchmark baseline."""

from fastssl.reference.sinkhorn import (
    sinkhorn_knopp_log_domain,
    sinkhorn_knopp_original,
    swav_loss_original,
)

__all__ = ["sinkhorn_knopp_log_domain", "sinkhorn_knopp_original", "swav_loss_original"]
