"""A feature extractor with a global ridge-regression classifier (LD-RR; label-distillation §3, Figure 5).

logits = s · [h, 1] W. W (a buffer, not trained by backprop) follows the pseudo-gradient
W ← (1−α) W + α W_l with W_l the ridge solution on a minibatch (eq. 3); the calibration scale s is
learned with the feature extractor.
"""

from __future__ import annotations

import torch
from torch import nn

from ddfast.ops.label_metagrad import ridge_logits
from ddfast.ops.ridge_solve import ridge_weights


class RidgeClassifier(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.features = features
        self.feature_dim, self.num_classes, self.bias = feature_dim, num_classes, bias
        self.register_buffer("weight", torch.zeros(feature_dim + int(bias), num_classes))
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def from_model(cls, model: nn.Module, bias: bool = True):
        """Reuse ``model.features``; the linear head is replaced by the ridge classifier."""
        return cls(model.features, model.head.in_features, model.head.out_features, bias)

    def forward(self, x):
        return ridge_logits(self.features(x), self.weight, self.scale, self.bias)

    def local_weights(self, z, y, lam: float = 1.0, backend: str = "auto"):
        """W_l = [z,1]ᵀ([z,1][z,1]ᵀ + λI)⁻¹ y (eq. 3)."""
        return ridge_weights(z, y, lam, bias=self.bias, backend=backend)

    @torch.no_grad()
    def pseudo_step(self, w_local, pseudo_lr: float = 0.01):
        """W ← (1−α) W + α W_l."""
        self.weight.mul_(1.0 - pseudo_lr).add_(w_local.detach(), alpha=pseudo_lr)

    @torch.no_grad()
    def reset_classifier(self):
        self.weight.zero_()
