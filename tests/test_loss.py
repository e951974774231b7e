"""AdaptiveLoss (class-balanced focal loss) against values computed by hand."""
import math

import pytest
import torch

from odconv import AdaptiveLoss, class_balanced_weights


def test_plain_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    # sample 0: p = e^2 / (e^2 + 1 + e^-1); sample 1: p = 1 / (2 e^0.5 + 1)
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (2 * math.exp(0.5) + 1)
    per_sample = [-0.25 * (1 - p) ** 2 * math.log(p) for p in (p0, p1)]
    loss = AdaptiveLoss(alpha=0.25, gamma=2.0)
    assert loss(logits, target).item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    assert AdaptiveLoss(reduction="sum")(logits, target).item() == pytest.approx(sum(per_sample), rel=1e-6)
    assert AdaptiveLoss(reduction="none")(logits, target).tolist() == pytest.approx(per_sample, rel=1e-6)


def test_gamma_zero_alpha_one_is_cross_entropy():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    torch.testing.assert_close(AdaptiveLoss(alpha=1.0, gamma=0.0)(logits, target),
                               torch.nn.functional.cross_entropy(logits, target))


def test_class_balanced_weights_by_hand():
    beta = 0.999
    counts = [10, 100, 1000]
    effective = [(1 - beta ** n) / (1 - beta) for n in counts]
    raw = [1 / e for e in effective]
    expected = [w * 3 / sum(raw) for w in raw]
    assert class_balanced_weights(counts, beta).tolist() == pytest.approx(expected, rel=1e-6)
    # rarer classes weigh more; the weights sum to the number of classes
    w = class_balanced_weights(counts, beta)
    assert w[0] > w[1] > w[2] and w.sum().item() == pytest.approx(3.0)


def test_weighted_focal_loss_by_hand():
    counts = [10, 100, 1000]
    weights = class_balanced_weights(counts, 0.999).tolist()
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    target = torch.tensor([2, 0])
    probs = torch.softmax(logits, dim=1)
    p = [probs[0, 2].item(), probs[1, 0].item()]
    per_sample = [weights[t] * -0.25 * (1 - pi) ** 2 * math.log(pi) for t, pi in zip([2, 0], p)]
    loss = AdaptiveLoss(class_counts=counts)
    assert loss(logits, target).item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_zero_count_class_and_bad_arguments():
    w = class_balanced_weights([0, 1, 5])
    assert w[0] == 0  # a class with no samples never occurs: it gets no weight ...
    assert w.sum().item() == pytest.approx(2.0)  # ... and does not dilute the others
    torch.testing.assert_close(w[1:], class_balanced_weights([1, 5]))
    with pytest.raises(ValueError, match="all zero"):
        class_balanced_weights([0, 0])
    with pytest.raises(ValueError, match="class_counts must be >= 0"):
        class_balanced_weights([3, -1])
    with pytest.raises(ValueError, match="balance_factor"):
        class_balanced_weights([3, 1], beta=1.0)
    with pytest.raises(ValueError, match="4 classes but class_counts had 3"):
        AdaptiveLoss(class_counts=[1, 2, 3])(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_gradient_flows():
    logits = torch.randn(4, 3, requires_grad=True)
    AdaptiveLoss(class_counts=[5, 1, 2])(logits, torch.tensor([0, 1, 2, 1])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
