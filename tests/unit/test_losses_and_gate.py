import pytest
import torch
import torch.nn.functional as F

from pipeline.core.losses import FocalLoss
from pipeline.stages.register import gate

pytestmark = pytest.mark.unit


def test_focal_gamma0_equals_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    ours = FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[6.0, 0.0], [0.2, 0.0]])  # one easy, one hard example of class 0
    target = torch.tensor([0, 0])
    per = [FocalLoss(2.0)(logits[i:i + 1], target[i:i + 1]) / F.cross_entropy(logits[i:i + 1], target[i:i + 1])
           for i in range(2)]
    assert per[0] < 0.01 < per[1]


def test_gate_rules():
    assert gate(0.5, None, 0.3, 0.0)[0] is True
    assert gate(0.2, None, 0.3, 0.0)[0] is False
    assert gate(0.60, 0.61, 0.0, 0.0)[0] is False
    assert gate(0.62, 0.61, 0.0, 0.02)[0] is False
    ok, reason = gate(0.64, 0.61, 0.0, 0.02)
    assert ok and "champion 0.6100" in reason
