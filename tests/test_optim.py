"""dmup_kernels.param_groups: depth-scaled learning rates for the residual stacks (docs/design.md §1.3)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from dmup_kernels import DepthMuPNet, DepthParametrization, ResidualStack, param_groups

LR = 3e-3

# two stacks with different depths, parametrizations and base depths; (alpha, gamma, base, depth)
SHALLOW = (0.5, 0.25, 2, 8)
DEEP = (1.0, 0.75, 4, 64)


def expected_scale(alpha: float, gamma: float, base: int, depth: int, optimizer: str) -> float:
    """The formula of docs/design.md §1.2, written out here."""
    exponent = -gamma if optimizer == "adam" else alpha - gamma
    return (depth / base) ** exponent


class TwoStackModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.shallow = ResidualStack(
            12,
            SHALLOW[3],
            bias=True,
            parametrization=DepthParametrization(SHALLOW[0], SHALLOW[1], base_depth=SHALLOW[2]),
        )
        self.norm = nn.LayerNorm(12)
        self.middle = nn.Sequential(
            nn.Linear(12, 12),
            ResidualStack(
                12, DEEP[3], parametrization=DepthParametrization(DEEP[0], DEEP[1], multiplier=2.0, base_depth=DEEP[2])
            ),
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.middle(self.norm(self.shallow(self.embed(x)))))


def group_of(groups, param):
    found = [g for g in groups if any(p is param for p in g["params"])]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_learning_rates(optimizer):
    model = TwoStackModel()
    groups = param_groups(model, LR, optimizer)
    shallow, deep = model.shallow, model.middle[1]
    shallow_lr = LR * expected_scale(*SHALLOW, optimizer)
    deep_lr = LR * expected_scale(*DEEP, optimizer)
    assert shallow_lr != pytest.approx(deep_lr) and shallow_lr != pytest.approx(LR)
    assert group_of(groups, shallow.weight)["lr"] == pytest.approx(shallow_lr, rel=1e-12)
    assert group_of(groups, shallow.bias)["lr"] == pytest.approx(shallow_lr, rel=1e-12)
    assert group_of(groups, shallow.weight) is group_of(groups, shallow.bias)
    assert group_of(groups, deep.weight)["lr"] == pytest.approx(deep_lr, rel=1e-12)
    others = [
        model.embed.weight,
        model.embed.bias,
        model.norm.weight,
        model.norm.bias,
        model.middle[0].weight,
        model.middle[0].bias,
        model.head.weight,
        model.head.bias,
    ]
    for p in others:
        assert group_of(groups, p)["lr"] == LR
        assert all(group_of(groups, p) is not group_of(groups, q) for q in (shallow.weight, deep.weight))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_every_trainable_parameter_exactly_once(optimizer):
    model = TwoStackModel()
    model.norm.weight.requires_grad_(False)
    groups = param_groups(model, LR, optimizer, weight_decay=0.01)
    counts = Counter(id(p) for g in groups for p in g["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(counts) == trainable
    assert all(count == 1 for count in counts.values())
    assert id(model.norm.weight) not in counts
    for g in groups:
        assert g["weight_decay"] == 0.01
        assert len(g["params"]) > 0
    assert all(isinstance(g["params"], list) for g in groups)


def test_default_is_adam_and_weight_decay_zero():
    model = TwoStackModel()
    groups = param_groups(model, LR)
    assert group_of(groups, model.shallow.weight)["lr"] == pytest.approx(LR * expected_scale(*SHALLOW, "adam"))
    assert all(g["weight_decay"] == 0.0 for g in groups)


def test_depth_mup_net():
    net = DepthMuPNet(4, 16, 25, 2)  # DEPTH_MUP, base depth 1: Adam lr / sqrt(25) = lr / 5
    groups = param_groups(net, 1.0, "adam")
    assert group_of(groups, net.stack.weight)["lr"] == pytest.approx(0.2, rel=1e-12)
    assert group_of(groups, net.input.weight)["lr"] == 1.0
    assert group_of(groups, net.output.weight)["lr"] == 1.0
    sgd = param_groups(net, 1.0, "sgd")
    assert group_of(sgd, net.stack.weight)["lr"] == pytest.approx(1.0, rel=1e-12)


def test_model_that_is_a_stack():
    stack = ResidualStack(6, 9)
    groups = param_groups(stack, 0.9, "adam")
    assert len(groups) == 1 and groups[0]["params"][0] is stack.weight
    assert groups[0]["lr"] == pytest.approx(0.3, rel=1e-12)


def test_tied_weights_raise():
    model = nn.Sequential(ResidualStack(8, 4), ResidualStack(8, 4), nn.Linear(8, 1))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="group"):
        param_groups(model, LR)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="optimizer"):
        param_groups(TwoStackModel(), LR, "adagrad")


def _train_step(model, optimizer_cls, groups, **kwargs):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = optimizer_cls(groups, **kwargs)
    dtype = next(model.parameters()).dtype
    loss = model(torch.randn(7, 5, dtype=dtype)).square().sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    return before, grads


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sgd_step_uses_group_lr(backend):
    """Plain SGD moves each parameter by exactly -lr_group * grad."""
    import dmup_kernels

    if backend == "cpp" and not dmup_kernels.HAS_CPP:
        pytest.skip("C++ extension not built")
    model = TwoStackModel().double()
    model.shallow.backend = backend
    model.middle[1].backend = backend
    before, grads = _train_step(model, torch.optim.SGD, param_groups(model, 0.1, "sgd"))
    lrs = {"shallow.": 0.1 * expected_scale(*SHALLOW, "sgd"), "middle.1.": 0.1 * expected_scale(*DEEP, "sgd")}
    for name, p in model.named_parameters():
        lr = next((value for prefix, value in lrs.items() if name.startswith(prefix)), 0.1)
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(p.detach(), before[name] - lr * grads[name], rtol=1e-12, atol=1e-14)


def test_adam_step_changes_every_parameter():
    model = TwoStackModel()
    groups = param_groups(model, 1e-2, "adam")
    before, _ = _train_step(model, torch.optim.Adam, groups)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    # Adam's first step moves each element by about lr: the deep stack moves less than the head
    deep_step = (model.middle[1].weight.detach() - before["middle.1.weight"]).abs().max().item()
    head_step = (model.head.weight.detach() - before["head.weight"]).abs().max().item()
    assert deep_step == pytest.approx(1e-2 * expected_scale(*DEEP, "adam"), rel=1e-3)
    assert head_step == pytest.approx(1e-2, rel=1e-3)
