"""dmup_kernels.param_groups: the width and depth rules for learning rate, Adam's epsilon and weight decay
(docs/design.md §1.3), checked against the table written out independently here, and the readout
multiplier of DepthMuPNet."""

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
    """The depth factor of the hidden learning rate (docs/design.md §1.2), written out here."""
    exponent = alpha - gamma if optimizer == "sgd" else -gamma
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
    assert group_of(groups, shallow.bias)["lr"] == pytest.approx(shallow_lr, rel=1e-12)  # no width scaling here
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
        assert g["weight_decay"] == 0.01  # coupled decay ("adam", "sgd") is never rescaled
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
    assert len(groups) == 1 and groups[0]["params"][0] is stack.weight and groups[0]["name"] == "weight"
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


# ---------------------------------------------------------------------------------------------------
# the width x depth table
# ---------------------------------------------------------------------------------------------------

WIDTH, DEPTH, BASE_DEPTH = 64, 32, 2
BASE_LR, BASE_EPS, BASE_WD = 0.01, 1e-8, 0.1


def table_entry(part: str, optimizer: str, alpha: float, gamma: float, base_width: int | None) -> dict[str, float]:
    """lr, eps and weight decay of one part, from the table of docs/design.md §1.3 written out here."""
    m_n = WIDTH / (base_width or WIDTH)
    m_l = DEPTH / BASE_DEPTH
    sgd, adamw = optimizer == "sgd", optimizer == "adamw"
    if part == "stack weight":
        lr = BASE_LR * m_l ** (alpha - gamma) if sgd else BASE_LR / m_n * m_l**-gamma
        eps, wd = BASE_EPS / m_n * m_l**-alpha, BASE_WD * m_n if adamw else BASE_WD
    elif part == "stack bias":
        lr = BASE_LR * m_n * m_l ** (alpha - gamma) if sgd else BASE_LR * m_l**-gamma
        eps, wd = BASE_EPS / m_n * m_l**-alpha, 0.0 if adamw else BASE_WD
    elif part in ("input weight", "input bias", "readout weight"):
        lr, eps, wd = BASE_LR * m_n if sgd else BASE_LR, BASE_EPS, BASE_WD
    else:  # readout bias
        lr, eps, wd = BASE_LR, BASE_EPS, BASE_WD
    return {"lr": lr, "eps": eps, "weight_decay": wd}


@pytest.mark.parametrize("base_width", [None, 16], ids=["no-width-scaling", "base-width-16"])
@pytest.mark.parametrize("alpha", [0.5, 1.0], ids=["alpha-1/2", "alpha-1"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_every_group_follows_the_table(optimizer, alpha, base_width):
    parametrization = DepthParametrization(alpha, 1.0 - alpha, base_depth=BASE_DEPTH)
    net = DepthMuPNet(5, WIDTH, DEPTH, 3, bias=True, parametrization=parametrization, base_width=base_width)
    groups = param_groups(net, BASE_LR, optimizer, weight_decay=BASE_WD, eps=BASE_EPS)
    parts = {
        "stack weight": net.stack.weight,
        "stack bias": net.stack.bias,
        "input weight": net.input.weight,
        "input bias": net.input.bias,
        "readout weight": net.output.weight,
        "readout bias": net.output.bias,
    }
    for part, param in parts.items():
        group = group_of(groups, param)
        expected = table_entry(part, optimizer, alpha, 1.0 - alpha, base_width)
        if optimizer == "sgd":
            assert "eps" not in group, part
            expected.pop("eps")
        for key, value in expected.items():
            assert group[key] == pytest.approx(value, rel=1e-12), f"{part}: {key}"
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_groups_go_straight_into_adam_and_adamw(optimizer_class):
    net = DepthMuPNet(5, 32, 8, 3, bias=True, base_width=8)
    name = "adamw" if optimizer_class is torch.optim.AdamW else "adam"
    groups = param_groups(net, 1e-3, name, weight_decay=0.01)
    optimizer = optimizer_class(groups)
    assert [g["eps"] for g in optimizer.param_groups] == [g["eps"] for g in groups]
    net(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()


def test_readout_multiplier_and_init():
    """output(h / m_N), with output weights of std 1/base_width: effective std 1/width at any width; with
    base_width = width (the default) the net is what it was without width scaling."""
    torch.manual_seed(0)
    net = DepthMuPNet(5, 256, 4, 3, base_width=64)
    h = torch.randn(7, 256)
    torch.testing.assert_close(net.readout(h), net.output(h / 4))
    assert net.output.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    x = torch.randn(7, 5)
    torch.testing.assert_close(net(x), net.output(net.stack(net.input(x)) / 4))
    plain = DepthMuPNet(5, 256, 4, 3)
    assert plain.stack.base_width == 256 and plain.stack.width_multiplier == 1
    assert plain.output.weight.std().item() == pytest.approx(1 / 256, rel=0.05)
    assert "base_width=64" in repr(net) and "base_depth=1" in repr(net)
