"""Optimizer parameter groups: the width (muP) and depth (Depth-muP / CompleteP) rules for the learning
rate, Adam's epsilon and weight decay of every part of a network (docs/design.md §1.3).

With m_N = width / base_width and m_L = total_depth / base_depth of each stack, and the stack's
parametrization (alpha, gamma):

    group            Adam / AdamW lr       eps                      AdamW decay   SGD lr
    (stack: every ResidualStack / ResidualMLPStack; its weights weight, weight1, weight2, its biases)
    stack weights    lr m_N^-1 m_L^-gamma  eps m_N^-1 m_L^-alpha    wd m_N        lr m_L^(alpha-gamma)
    stack biases     lr m_L^-gamma         eps m_N^-1 m_L^-alpha    0             lr m_N m_L^(alpha-gamma)
    input layer      lr                    eps                      wd            lr m_N
    readout weight   lr                    eps                      wd            lr m_N
    readout bias     lr                    eps                      wd            lr
    anything else    lr                    eps                      wd            lr

"adam" (torch.optim.Adam, weight decay as coupled L2) and "sgd" keep ``weight_decay`` as given.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._checks import check_choice, check_non_negative
from .nn import DepthMuPNet, DepthScaledStack
from .parametrization import OPTIMIZERS


def param_groups(
    model: nn.Module,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> list[dict[str, Any]]:
    """Param groups for ``torch.optim.Adam`` / ``AdamW`` / ``SGD`` following the table above.

    Every stack (``ResidualStack``, ``ResidualMLPStack``) gets a group for its weights and one for its
    biases, by its own width
    multiplier m_N = width / base_width, depth ratio m_L = total_depth / base_depth (the depth of the
    whole network, also for a pipeline stage) and parametrization. A ``DepthMuPNet`` also gets groups for
    its input layer and its readout weight and bias (the readout's 1/m_N multiplier is in its forward).
    Every other parameter gets ``lr``, ``eps`` and ``weight_decay`` unchanged. Only trainable parameters
    are grouped; each group has a ``name``.

    Why the rules: under muP a hidden weight's Adam update must shrink like 1/m_N to move its layer's
    output by O(1), and its gradients shrink like 1/m_N (times m_L^-alpha through the branch
    multiplier), so epsilon follows them or it would dominate the update at large width and depth.
    AdamW's decoupled decay multiplies the weights by 1 - lr * wd per step: ``wd * m_N`` keeps that
    product width-independent. With "adam", decay is L2 added to the gradient before Adam normalises it,
    so it takes the group's learning rate like the gradient does: it is left as given. SGD's rules
    (muP with this initialisation) are derived in docs/design.md §1.3.

    Args:
        model: any module tree.
        lr: the base learning rate (eta). weight_decay: the base weight decay. eps: Adam's base epsilon
            (only the Adam family's groups carry ``eps``).
        optimizer: "adam" (torch.optim.Adam), "adamw" (torch.optim.AdamW) or "sgd".
    Raises:
        TypeError: if model is not an nn.Module, or lr / weight_decay / eps is not a real number.
        ValueError: if lr, weight_decay or eps is negative or not finite, optimizer is unknown, or one
            parameter would be in two groups (e.g. weights tied across stacks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    lr = check_non_negative(lr, "lr")
    weight_decay = check_non_negative(weight_decay, "weight_decay")
    eps = check_non_negative(eps, "eps")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    sgd, decoupled = optimizer == "sgd", optimizer == "adamw"
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, params: list[nn.Parameter], lr_factor: float, eps_factor: float, decay_factor: float) -> None:
        params = [p for p in params if p is not None and p.requires_grad]
        for param in params:
            if id(param) in seen:
                raise ValueError(f"a parameter of {name!r} is already in another group (shared between stacks?)")
            seen.add(id(param))
        if params:
            group = {"params": params, "lr": lr * lr_factor, "weight_decay": weight_decay * decay_factor, "name": name}
            if not sgd:
                group["eps"] = eps * eps_factor
            groups.append(group)

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DepthMuPNet):
            width_ratio = module.stack.width_multiplier
            add(f"{prefix}input", list(module.input.parameters()), width_ratio if sgd else 1.0, 1.0, 1.0)
            add(f"{prefix}output.weight", [module.output.weight], width_ratio if sgd else 1.0, 1.0, 1.0)
            add(f"{prefix}output.bias", [module.output.bias], 1.0, 1.0, 1.0)
        elif isinstance(module, DepthScaledStack):
            width_ratio, rules = module.width_multiplier, module.parametrization
            depth_lr = rules.lr_scale(module.total_depth, optimizer)
            hidden_eps = rules.eps_scale(module.total_depth) / width_ratio
            params = dict(module.named_parameters())
            weights = [p for key, p in params.items() if key.startswith("weight")]
            biases = [p for key, p in params.items() if key.startswith("bias")]
            weight_lr = depth_lr if sgd else depth_lr / width_ratio
            add(f"{prefix}weight", weights, weight_lr, hidden_eps, width_ratio if decoupled else 1.0)
            bias_lr = depth_lr * width_ratio if sgd else depth_lr
            add(f"{prefix}bias", biases, bias_lr, hidden_eps, 0.0 if decoupled else 1.0)
    add("other", [p for p in model.parameters() if id(p) not in seen], 1.0, 1.0, 1.0)
    return groups
