"""AdaptiveLoss: focal loss with class-balanced weights (Lin et al. 2017; Cui et al. 2019)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AdaptiveLoss", "class_balanced_weights"]


def class_balanced_weights(class_counts, beta=0.999):
    """Weights inversely proportional to the effective number of samples.

    E_n = (1 - beta^n) / (1 - beta) per class; w_c = 1 / E_{n_c}, scaled so the weights sum to the
    number of classes (Cui et al., CVPR 2019). A class with no samples gets weight 0 and does not
    count in that sum: it never occurs in the loss, and weighting it as if it had samples would
    shrink every other class's weight.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError(f"class_counts must be >= 0, got {counts.tolist()}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"balance_factor (beta) must be in [0, 1), got {beta}")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero")
    effective = (1.0 - beta ** counts) / (1.0 - beta)
    weights = torch.where(present, 1.0 / effective.clamp(min=1e-12), torch.zeros_like(counts))
    return (weights * present.sum() / weights.sum()).float()


class AdaptiveLoss(nn.Module):
    """Focal loss with class-balanced weights.

    loss_i = w[y_i] * alpha * (1 - p_i)^gamma * (-log p_i), p_i the softmax probability of the true
    class; averaged over the batch (``reduction="mean"``), summed (``"sum"``) or per sample
    (``"none"``). ``class_counts`` (one count per class) gives w by the effective number of samples
    with ``balance_factor`` beta; without counts w = 1 and it is plain focal loss.
    """

    def __init__(self, alpha=0.25, gamma=2.0, balance_factor=0.999, class_counts=None, reduction="mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha, self.gamma, self.balance_factor, self.reduction = float(alpha), float(gamma), balance_factor, reduction
        weights = None if class_counts is None else class_balanced_weights(class_counts, balance_factor)
        self.register_buffer("class_weights", weights)

    def forward(self, logits, target):
        if logits.dim() != 2:
            raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
        if self.class_weights is not None and logits.shape[1] != self.class_weights.numel():
            raise ValueError(f"logits have {logits.shape[1]} classes but class_counts had {self.class_weights.numel()}")
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        p = log_p.exp()
        loss = -self.alpha * (1.0 - p).pow(self.gamma) * log_p
        if self.class_weights is not None:
            loss = loss * self.class_weights[target]
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self):
        return (f"alpha={self.alpha}, gamma={self.gamma}, balance_factor={self.balance_factor}, "
                f"class_balanced={self.class_weights is not None}")
