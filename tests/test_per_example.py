"""ddfast.per_example: layer kinds registered by module type; a new kind plugs in without touching the ops."""

import pytest
import torch
from torch import nn

from ddfast.per_example import LayerKind, kind_of, per_example_grad_norms, register, registered
from ddfast.reference.ghost_products import per_example_grad_norms_ref


def test_kinds_by_module_type_and_mro():
    class MyLinear(nn.Linear):
        pass

    assert kind_of(nn.Linear(2, 3)).name == "linear" and kind_of(MyLinear(2, 3)).name == "linear"
    assert kind_of(nn.Conv2d(2, 4, 3)).name == "conv2d"
    assert kind_of(nn.Conv2d(2, 4, 3, groups=2)).name == "generic"  # not accepted: the torch.func fallback
    assert kind_of(nn.BatchNorm2d(3)).name == "norm" and kind_of(nn.GroupNorm(1, 3)).name == "norm"
    assert kind_of(nn.PReLU()).name == "generic"
    assert registered()[nn.Linear] == "linear"
    with pytest.raises(TypeError, match="register"):
        register(int)(LayerKind)


class Scale(nn.Module):
    """y = x ⊙ s (one scale per feature): per-example gradient g ⊙ x."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_a_registered_kind_is_used_and_matches_the_batch_of_one_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    want = per_example_grad_norms_ref(model, x, y)
    calls = []

    @register(Scale)
    class ScaleKind(LayerKind):
        name = "scale"

        def grads(self, record, grad, local):
            calls.append(record.name)
            return {"s": grad * record.input}

    try:
        got = per_example_grad_norms(model, x, y)
    finally:
        from ddfast.per_example import registry

        registry._REGISTRY.pop(Scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert calls == ["1"]
    # without the registration the generic torch.func kind gives the same values
    torch.testing.assert_close(per_example_grad_norms(model, x, y), want, rtol=1e-10, atol=1e-12)
