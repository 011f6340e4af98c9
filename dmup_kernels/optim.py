"""Optimizer parameter groups with depth-scaled learning rates for the hidden weights (docs/design.md §1.3)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._checks import check_choice, check_non_negative
from .nn import DepthScaledStack
from .parametrization import OPTIMIZERS


def param_groups(
    model: nn.Module, lr: float, optimizer: str = "adam", weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Param groups for ``torch.optim``: the parameters of each stack (``ResidualStack``, ``ResidualMLPStack``:
    every ``DepthScaledStack``) get
    ``lr * stack.parametrization.lr_scale(stack.total_depth, optimizer)``, all other parameters ``lr``
    (``total_depth``: the depth of the whole network, also for a pipeline stage of it).

    Args:
        model: any module tree; every stack in it gets its own group.
        lr: the base learning rate (eta).
        optimizer: "adam" for Adam-like optimizers (AdamW, ...), "sgd" for SGD.
        weight_decay: set on every group.
    Raises:
        TypeError: if model is not an nn.Module, or lr / weight_decay is not a real number.
        ValueError: if lr or weight_decay is negative or not finite, optimizer is unknown, or one parameter
            would be in two groups (e.g. weights tied across stacks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    lr = check_non_negative(lr, "lr")
    weight_decay = check_non_negative(weight_decay, "weight_decay")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()

    def claim(params: list[nn.Parameter], owner: str) -> list[nn.Parameter]:
        for param in params:
            if id(param) in seen:
                raise ValueError(f"parameter of {owner} is already in another group (shared between stacks?)")
            seen.add(id(param))
        return params

    for name, module in model.named_modules():
        if isinstance(module, DepthScaledStack):
            params = claim([p for p in module.parameters() if p.requires_grad], f"stack {name!r}")
            scale = module.parametrization.lr_scale(module.total_depth, optimizer)
            groups.append({"params": params, "lr": lr * scale, "weight_decay": weight_decay, "name": name or "stack"})
    rest = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups
