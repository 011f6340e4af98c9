"""Drop-in ``torch.nn`` modules for Depth-muP residual networks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import reference
from ._checks import (
    check_activation,
    check_block,
    check_checkpoint,
    check_choice,
    check_flag,
    check_float_dtype,
    check_like,
    check_positive_int,
    check_scale,
    check_tensor,
    check_width,
)
from .ops import BACKENDS, residual_mlp_stack, residual_stack, scaled_residual
from .parametrization import DEPTH_MUP, DepthParametrization


class ScaledResidual(nn.Module):
    """``x + scale * MS(phi(branch(x)))`` around any branch module (docs/design.md §2.2, generic branch).

    Args:
        branch: the residual branch f; must map (..., n) to (..., n).
        scale: branch multiplier s, e.g. ``DEPTH_MUP.branch_scale(L)``.
        activation: phi applied to the branch output ("identity" for none).
        mean_subtract: subtract the mean over the width after phi.
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
    """

    def __init__(
        self,
        branch: nn.Module,
        scale: float,
        activation: str = "identity",
        mean_subtract: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module; got {type(branch).__name__}")
        self.branch = branch
        self.scale = check_scale(scale)
        self.activation = check_activation(activation)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        self.backend = check_choice(backend, "backend", BACKENDS)

    def reset_parameters(self) -> None:
        """Re-initialises the branch: calls ``reset_parameters`` of the branch if it has one, else of each
        outermost submodule that has one. A module's own ``reset_parameters`` initialises its submodules
        its way (as ``DepthMuPNet``'s does), which resetting them after it would undo."""
        pending = [self.branch]
        while pending:
            module = pending.pop()
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                pending.extend(module.children())

    def forward(self, x: Tensor) -> Tensor:
        check_tensor(x, "x")  # before the branch, so a bad x is named here rather than deep inside it
        return scaled_residual(x, self.branch(x), self.scale, self.activation, self.mean_subtract, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:.6g}, activation={self.activation!r}, mean_subtract={self.mean_subtract}, "
            f"backend={self.backend!r}"
        )


class DepthScaledStack(nn.Module):
    """The base of the stack modules (``ResidualStack``, ``ResidualMLPStack``): ``depth`` residual blocks
    on a stream of width ``width``, every parameter with the depth as its first dimension, the branch
    scale s of a network of ``total_depth`` blocks, and pipeline stages (``split``). ``param_groups``
    gives the parameters of every such stack the depth-scaled learning rate of hidden weights."""

    def _init_stack(
        self,
        width: int,
        depth: int,
        total_depth: int | None,
        parametrization: DepthParametrization,
        backend: str,
        checkpoint: int | str | None,
        base_width: int | None,
    ) -> None:
        """Validates and sets the settings every stack has."""
        self.width = check_positive_int(width, "width")
        self.base_width = self.width if base_width is None else check_positive_int(base_width, "base_width")
        self.depth = check_positive_int(depth, "depth")
        self.total_depth = self.depth if total_depth is None else check_positive_int(total_depth, "total_depth")
        if self.total_depth < self.depth:
            raise ValueError(
                f"total_depth must be >= depth ({self.depth}), the blocks of this stack; got {total_depth}"
            )
        if not isinstance(parametrization, DepthParametrization):
            raise TypeError(f"parametrization must be a DepthParametrization; got {type(parametrization).__name__}")
        self.parametrization = parametrization
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.checkpoint = check_checkpoint(checkpoint)

    @property
    def scale(self) -> float:
        """The branch multiplier s = parametrization.branch_scale(total_depth)."""
        return self.parametrization.branch_scale(self.total_depth)

    @property
    def width_multiplier(self) -> float:
        """m_N = width / base_width, the width ratio of the muP rules in ``param_groups``."""
        return self.width / self.base_width

    def _settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments for a stack with this one's settings (``total_depth``
        included), on its device and dtype: what the stages of ``split`` are built with."""
        first = next(self.parameters())
        return {
            "activation": self.activation,
            "mean_subtract": self.mean_subtract,
            "parametrization": self.parametrization,
            "backend": self.backend,
            "total_depth": self.total_depth,
            "base_width": self.base_width,
            "checkpoint": self.checkpoint,
            "device": first.device,
            "dtype": first.dtype,
        }

    def _sizes(self) -> tuple[int, ...]:
        """The constructor's positional arguments before ``depth``."""
        return (self.width,)

    def split(self, num_stages: int) -> list[DepthScaledStack]:
        """Cuts the stack into ``num_stages`` stacks of consecutive blocks, for pipeline parallelism.

        ``nn.Sequential(*stack.split(k))`` computes what ``stack`` computes. Stage k holds blocks
        [start_k, start_k + depth_k), the first ``depth % num_stages`` stages one block more than the rest,
        and this stack's settings, ``total_depth`` included, so every stage keeps the branch scale s (and
        hidden learning rate) of the whole network. Its parameters are copies (with their
        ``requires_grad``), not views: each stage owns its weights and can live on its own device or
        process, as pipeline schedules need; changes to a stage do not reach this stack.
        """
        num_stages = check_positive_int(num_stages, "num_stages")
        if num_stages > self.depth:
            raise ValueError(f"num_stages must be at most depth ({self.depth}), one block per stage; got {num_stages}")
        stages = []
        for layers in torch.arange(self.depth).tensor_split(num_stages):
            start, stop = int(layers[0]), int(layers[-1]) + 1
            stage = type(self)(*self._sizes(), stop - start, **self._settings())
            for name, param in stage.named_parameters():
                _copy_parameter(param, getattr(self, name)[start:stop])
            stages.append(stage)
        return stages

    def _repr_with(self, sizes: str, block: str, bias: bool) -> str:
        """extra_repr from the stack's ``sizes``, ``block`` settings and ``bias`` and the settings every stack
        has."""
        p = self.parametrization
        return (
            f"{sizes}, base_width={self.base_width}, depth={self.depth}, total_depth={self.total_depth}, {block}, "
            f"mean_subtract={self.mean_subtract}, bias={bias}, scale={self.scale:.6g}, "
            f"parametrization=(alpha={p.alpha}, gamma={p.gamma}, multiplier={p.multiplier}, "
            f"base_depth={p.base_depth}), backend={self.backend!r}"
            + ("" if self.checkpoint is None else f", checkpoint={self.checkpoint!r}")
        )


class ResidualStack(DepthScaledStack):
    """``depth`` residual blocks of width ``width`` with one (depth, width, width) weight.

    block "post" (default, the paper's form): x <- x + s * MS(phi(x @ W_l^T + b_l))
    block "pre":                               x <- x + s * MS(phi(x) @ W_l^T + b_l)
    with s = ``parametrization.branch_scale(total_depth)`` and MS only when ``mean_subtract``.
    Hidden weights are initialised with variance 1/width (muP), biases with zeros.

    Args:
        width: n, the residual-stream width. depth: the number of blocks in this module.
        activation: phi. block: "post" or "pre". mean_subtract: MS on the branch output.
        bias: add a learnable bias of shape (depth, width).
        parametrization: the depth scaling rule (DEPTH_MUP by default).
        backend: one of ``BACKENDS`` ("auto", "reference", "cpp", "cuda", "triton").
        total_depth: L, the number of blocks of the whole residual network this stack is a part of
            (default ``depth``). The branch scale s and the hidden learning rate (``param_groups``)
            are computed for it: Depth-muP scales by the depth of the network, so a pipeline stage
            holding some of its blocks (``split``) keeps the scale of the whole.
        base_width: the width at which the width rules of ``param_groups`` (muP) are the identity; the
            width multiplier is m_N = width / base_width (default None: base_width = width, no width
            scaling). The forward does not depend on it.
        checkpoint: what the forward keeps for the backward: None (every layer's input), an int k >= 1
            (the stream state every k layers; the backward recomputes the rest), or "sqrt" (k =
            ceil(sqrt(depth))). See ``dmup_kernels.residual_stack``.
        device, dtype: of the parameters, as for ``nn.Linear``.
    Input: (..., width). Output: same shape.
    Conversions: ``split`` (pipeline stages), ``from_linears`` / ``to_reference_modules`` (a list of
    ``nn.Linear`` / an ``nn.Sequential`` of eager ``ReferenceBlock``).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        *,
        activation: str = "relu",
        block: str = "post",
        mean_subtract: bool = True,
        bias: bool = False,
        parametrization: DepthParametrization = DEPTH_MUP,
        backend: str = "auto",
        total_depth: int | None = None,
        base_width: int | None = None,
        checkpoint: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_stack(width, depth, total_depth, parametrization, backend, checkpoint, base_width)
        self.activation = check_activation(activation)
        self.block = check_block(block)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        check_float_dtype(dtype, "dtype")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(depth, width, width, **factory))
        self.bias = nn.Parameter(torch.empty(depth, width, **factory)) if check_flag(bias, "bias") else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_hidden(self.weight, self.bias)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "block": self.block, "bias": self.bias is not None}

    @classmethod
    def from_linears(
        cls,
        linears: Iterable[nn.Linear],
        *,
        activation: str = "relu",
        block: str = "post",
        mean_subtract: bool = True,
        parametrization: DepthParametrization = DEPTH_MUP,
        backend: str = "auto",
        total_depth: int | None = None,
        base_width: int | None = None,
        checkpoint: int | str | None = None,
    ) -> ResidualStack:
        """A stack whose block l uses ``linears[l]``: W_l = ``linears[l].weight``, b_l = ``linears[l].bias``.

        The weights are copied (with their ``requires_grad``), so the stack and the layers are independent
        afterwards. Every layer must be an ``nn.Linear(n, n)`` of one width n, dtype and device, all with a
        bias or all without; the stack has a bias exactly when they do. The other arguments are those of
        the constructor; ``depth = len(linears)``. Reverses ``to_reference_modules``:
        ``from_linears([b.linear for b in stack.to_reference_modules()], <stack's settings>)`` equals ``stack``.
        """
        layers = _layer_list(linears, "linears", "nn.Linear")
        _check_linears([(f"linears[{i}]", layer) for i, layer in enumerate(layers)], "linears")
        first = layers[0]
        for i, layer in enumerate(layers):
            if layer.in_features != layer.out_features:
                raise ValueError(
                    f"linears[{i}] must be square, nn.Linear(n, n); got nn.Linear({layer.in_features}, "
                    f"{layer.out_features})"
                )
            if layer.in_features != first.in_features:
                raise ValueError(
                    f"linears must all have one width; linears[0] has {first.in_features}, linears[{i}] has "
                    f"{layer.in_features}"
                )
        stack = cls(
            first.in_features,
            len(layers),
            activation=activation,
            block=block,
            mean_subtract=mean_subtract,
            bias=first.bias is not None,
            parametrization=parametrization,
            backend=backend,
            total_depth=total_depth,
            base_width=base_width,
            checkpoint=checkpoint,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        _copy_parameter(stack.weight, torch.stack([layer.weight for layer in layers]))
        if stack.bias is not None:
            _copy_parameter(stack.bias, torch.stack([layer.bias for layer in layers]))
        return stack

    def to_reference_modules(self) -> nn.Sequential:
        """An equivalent ``nn.Sequential`` of ``depth`` eager ``ReferenceBlock`` modules, block l holding
        ``nn.Linear`` copies of W_l and b_l (with their ``requires_grad``) and the scale s of this stack.

        Plain PyTorch from then on (no dmup ops); ``ResidualStack.from_linears`` turns it back.
        """
        blocks = []
        for index in range(self.depth):
            block = ReferenceBlock(
                self.width,
                scale=self.scale,
                activation=self.activation,
                block=self.block,
                mean_subtract=self.mean_subtract,
                bias=self.bias is not None,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
            _copy_parameter(block.linear.weight, self.weight[index])
            if self.bias is not None:
                _copy_parameter(block.linear.bias, self.bias[index])
            blocks.append(block)
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor, return_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The stack's output; with ``return_states`` also the states x^0..x^L as a detached tensor of
        shape (depth + 1, ..., width)."""
        check_width(x, "x", self.width)
        check_like(x, "x", self.weight, "weight", autocast=True)
        return residual_stack(
            x,
            self.weight,
            self.bias,
            scale=self.scale,
            activation=self.activation,
            block=self.block,
            mean_subtract=self.mean_subtract,
            backend=self.backend,
            checkpoint=self.checkpoint,
            return_states=return_states,
        )

    def extra_repr(self) -> str:
        return self._repr_with(
            f"width={self.width}", f"activation={self.activation!r}, block={self.block!r}", self.bias is not None
        )


class ResidualMLPStack(DepthScaledStack):
    """``depth`` MLP residual blocks: a stream of width ``width`` and a hidden layer of width ``hidden_width``.

    x <- x + s * MS(phi(x @ W1_l^T + b1_l) @ W2_l^T + b2_l)

    with s = ``parametrization.branch_scale(total_depth)`` and MS only when ``mean_subtract``. Parameters:
    ``weight1`` (depth, hidden_width, width), ``weight2`` (depth, width, hidden_width) and, with ``bias``,
    ``bias1`` (depth, hidden_width) and ``bias2`` (depth, width). Weights are initialised with variance
    1/fan_in (muP: 1/width for weight1, 1/hidden_width for weight2), biases with zeros.

    Args:
        width: n, the residual-stream width. hidden_width: m. depth: the number of blocks in this module.
        activation: phi. mean_subtract: MS on the branch output. bias: add bias1 and bias2.
        parametrization, backend, total_depth, base_width, checkpoint, device, dtype: as in ``ResidualStack``.
    Input: (..., width). Output: same shape.
    Conversions: ``split`` (pipeline stages), ``from_linears`` / ``to_reference_modules`` (pairs of
    ``nn.Linear`` / an ``nn.Sequential`` of eager ``ReferenceMLPBlock``).
    """

    def __init__(
        self,
        width: int,
        hidden_width: int,
        depth: int,
        *,
        activation: str = "relu",
        mean_subtract: bool = False,
        bias: bool = False,
        parametrization: DepthParametrization = DEPTH_MUP,
        backend: str = "auto",
        total_depth: int | None = None,
        base_width: int | None = None,
        checkpoint: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_stack(width, depth, total_depth, parametrization, backend, checkpoint, base_width)
        self.hidden_width = check_positive_int(hidden_width, "hidden_width")
        self.activation = check_activation(activation)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        check_float_dtype(dtype, "dtype")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight1 = nn.Parameter(torch.empty(depth, hidden_width, width, **factory))
        self.weight2 = nn.Parameter(torch.empty(depth, width, hidden_width, **factory))
        with_bias = check_flag(bias, "bias")
        self.bias1 = nn.Parameter(torch.empty(depth, hidden_width, **factory)) if with_bias else None
        self.bias2 = nn.Parameter(torch.empty(depth, width, **factory)) if with_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_hidden(self.weight1, self.bias1)
        _init_hidden(self.weight2, self.bias2)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "bias": self.bias2 is not None}

    def _sizes(self) -> tuple[int, ...]:
        return (self.width, self.hidden_width)

    @classmethod
    def from_linears(
        cls,
        pairs: Iterable[tuple[nn.Linear, nn.Linear]],
        *,
        activation: str = "relu",
        mean_subtract: bool = False,
        parametrization: DepthParametrization = DEPTH_MUP,
        backend: str = "auto",
        total_depth: int | None = None,
        base_width: int | None = None,
        checkpoint: int | str | None = None,
    ) -> ResidualMLPStack:
        """A stack whose block l uses ``pairs[l] = (linear1, linear2)``: W1_l = ``linear1.weight``, b1_l =
        ``linear1.bias``, W2_l = ``linear2.weight``, b2_l = ``linear2.bias``.

        The weights are copied (with their ``requires_grad``). Every pair must be ``(nn.Linear(n, m),
        nn.Linear(m, n))`` with the n and m of the first pair, all layers of one dtype and device, all with a
        bias or all without. The other arguments are those of the constructor; ``depth = len(pairs)``.
        Reverses ``to_reference_modules``: ``from_linears([(b.linear1, b.linear2) for b in
        stack.to_reference_modules()], <stack's settings>)`` equals ``stack``.
        """
        items = _layer_list(pairs, "pairs", "(nn.Linear, nn.Linear) pairs")
        for i, pair in enumerate(items):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a pair (nn.Linear(n, m), nn.Linear(m, n)); got {pair!r}")
        _check_linears([(f"pairs[{i}][{j}]", layer) for i, pair in enumerate(items) for j, layer in enumerate(pair)],
                       "the layers of pairs")  # fmt: skip
        width, hidden_width = items[0][0].in_features, items[0][0].out_features
        for i, (first, second) in enumerate(items):
            shapes = (first.in_features, first.out_features, second.in_features, second.out_features)
            if shapes != (width, hidden_width, hidden_width, width):
                raise ValueError(
                    f"pairs[{i}] must be (nn.Linear({width}, {hidden_width}), nn.Linear({hidden_width}, {width})) "
                    f"like pairs[0]; got (nn.Linear({shapes[0]}, {shapes[1]}), nn.Linear({shapes[2]}, {shapes[3]}))"
                )
        first = items[0][0]
        stack = cls(
            width,
            hidden_width,
            len(items),
            activation=activation,
            mean_subtract=mean_subtract,
            bias=first.bias is not None,
            parametrization=parametrization,
            backend=backend,
            total_depth=total_depth,
            base_width=base_width,
            checkpoint=checkpoint,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        for j, (weight, bias) in enumerate(((stack.weight1, stack.bias1), (stack.weight2, stack.bias2))):
            _copy_parameter(weight, torch.stack([pair[j].weight for pair in items]))
            if bias is not None:
                _copy_parameter(bias, torch.stack([pair[j].bias for pair in items]))
        return stack

    def to_reference_modules(self) -> nn.Sequential:
        """An equivalent ``nn.Sequential`` of ``depth`` eager ``ReferenceMLPBlock`` modules, block l holding
        ``nn.Linear`` copies of W1_l, b1_l, W2_l, b2_l (with their ``requires_grad``) and the scale s of this
        stack. Plain PyTorch from then on; ``ResidualMLPStack.from_linears`` turns it back."""
        blocks = []
        for index in range(self.depth):
            block = ReferenceMLPBlock(
                self.width,
                self.hidden_width,
                scale=self.scale,
                activation=self.activation,
                mean_subtract=self.mean_subtract,
                bias=self.bias2 is not None,
                device=self.weight1.device,
                dtype=self.weight1.dtype,
            )
            for linear, weight, bias in (
                (block.linear1, self.weight1, self.bias1),
                (block.linear2, self.weight2, self.bias2),
            ):
                _copy_parameter(linear.weight, weight[index])
                if bias is not None:
                    _copy_parameter(linear.bias, bias[index])
            blocks.append(block)
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor, return_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The stack's output; with ``return_states`` also the states x^0..x^L as a detached tensor of
        shape (depth + 1, ..., width)."""
        check_width(x, "x", self.width)
        check_like(x, "x", self.weight1, "weight1", autocast=True)
        return residual_mlp_stack(
            x,
            self.weight1,
            self.weight2,
            self.bias1,
            self.bias2,
            scale=self.scale,
            activation=self.activation,
            mean_subtract=self.mean_subtract,
            checkpoint=self.checkpoint,
            backend=self.backend,
            return_states=return_states,
        )

    def extra_repr(self) -> str:
        return self._repr_with(
            f"width={self.width}, hidden_width={self.hidden_width}",
            f"activation={self.activation!r}",
            self.bias2 is not None,
        )


class ReferenceBlock(nn.Module):
    """One residual block in plain eager PyTorch (``dmup_kernels.reference``) around an ``nn.Linear``:

    block "post": x + s * MS(phi(linear(x)))        block "pre": x + s * MS(linear(phi(x)))

    with MS only when ``mean_subtract``: block l of a ``ResidualStack`` with ``linear`` holding W_l and b_l
    (``ResidualStack.to_reference_modules`` builds them). Initialised like the stack: weight variance
    1/width, bias zero.

    Args:
        width: n; ``linear`` is ``nn.Linear(width, width, bias)``.
        scale: s, the branch multiplier of the network the block belongs to.
        activation, block, mean_subtract: as in ``ResidualStack``. bias: ``linear`` has a bias.
        device, dtype: of the parameters, as for ``nn.Linear``.
    Input: (..., width). Output: same shape.
    """

    def __init__(
        self,
        width: int,
        *,
        scale: float,
        activation: str = "relu",
        block: str = "post",
        mean_subtract: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.width = check_positive_int(width, "width")
        self.scale = check_scale(scale)
        self.activation = check_activation(activation)
        self.block = check_block(block)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        self.linear = nn.Linear(width, width, bias=check_flag(bias, "bias"), device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_hidden(self.linear.weight, self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, "x", self.width)
        return reference.BLOCK_FUNCTIONS[self.block](
            x,
            self.linear.weight,
            self.linear.bias,
            scale=self.scale,
            activation=self.activation,
            mean_subtract=self.mean_subtract,
        )

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:.6g}, activation={self.activation!r}, block={self.block!r}, "
            f"mean_subtract={self.mean_subtract}"
        )


class ReferenceMLPBlock(nn.Module):
    """One MLP residual block in plain eager PyTorch (``dmup_kernels.reference.mlp_block``) around two
    ``nn.Linear``: x + s * MS(linear2(phi(linear1(x)))), MS only when ``mean_subtract``: block l of a
    ``ResidualMLPStack`` (``ResidualMLPStack.to_reference_modules`` builds them). Initialised like the
    stack: weight variance 1/fan_in, biases zero.

    Args:
        width: n. hidden_width: m; ``linear1`` is ``nn.Linear(n, m, bias)``, ``linear2`` ``nn.Linear(m, n, bias)``.
        scale: s, the branch multiplier of the network the block belongs to.
        activation, mean_subtract: as in ``ResidualMLPStack``. bias: both linears have a bias.
        device, dtype: of the parameters, as for ``nn.Linear``.
    Input: (..., width). Output: same shape.
    """

    def __init__(
        self,
        width: int,
        hidden_width: int,
        *,
        scale: float,
        activation: str = "relu",
        mean_subtract: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.width = check_positive_int(width, "width")
        self.hidden_width = check_positive_int(hidden_width, "hidden_width")
        self.scale = check_scale(scale)
        self.activation = check_activation(activation)
        self.mean_subtract = check_flag(mean_subtract, "mean_subtract")
        factory: dict[str, Any] = {"bias": check_flag(bias, "bias"), "device": device, "dtype": dtype}
        self.linear1 = nn.Linear(width, hidden_width, **factory)
        self.linear2 = nn.Linear(hidden_width, width, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.linear1, self.linear2):
            _init_hidden(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, "x", self.width)
        return reference.mlp_block(
            x,
            self.linear1.weight,
            self.linear2.weight,
            self.linear1.bias,
            self.linear2.bias,
            scale=self.scale,
            activation=self.activation,
            mean_subtract=self.mean_subtract,
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, activation={self.activation!r}, mean_subtract={self.mean_subtract}"


def _init_hidden(weight: Tensor, bias: Tensor | None) -> None:
    """muP init of residual-branch layers: weight entries N(0, 1/width) (width = last dim), bias zero."""
    nn.init.normal_(weight, std=1.0 / math.sqrt(weight.shape[-1]))
    if bias is not None:
        nn.init.zeros_(bias)


def _copy_parameter(param: nn.Parameter, value: Tensor) -> None:
    """Copies ``value`` into ``param`` outside autograd; ``param`` takes over ``value.requires_grad``."""
    with torch.no_grad():
        param.copy_(value)
    param.requires_grad_(value.requires_grad)


def _layer_list(layers: object, name: str, item: str) -> list[Any]:
    """``layers``, any iterable but a single ``nn.Linear`` or a tensor, as a non-empty list."""
    if isinstance(layers, (nn.Linear, Tensor)) or not isinstance(layers, Iterable):
        raise TypeError(f"{name} must be a sequence of {item}; got {type(layers).__name__}")
    items = list(layers)
    if not items:
        raise ValueError(f"{name} must hold at least one {item}; got an empty sequence")
    return items


def _check_linears(labeled: list[tuple[str, Any]], name: str) -> None:
    """Every layer of ``labeled`` ((label, layer) pairs, ``name`` for all of them) is an ``nn.Linear`` with
    the weight dtype and device of the first, and all have a bias or none has."""
    first_label, first = labeled[0]
    for label, layer in labeled:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{label} must be an nn.Linear; got {type(layer).__name__}")
        if (layer.bias is None) != (first.bias is None):
            raise ValueError(
                f"{name} must all have a bias or all have none; {first_label} has "
                f"{'one' if first.bias is not None else 'none'}, {label} "
                f"{'has one' if layer.bias is not None else 'has none'}"
            )
        check_like(layer.weight, f"{label}.weight", first.weight, f"{first_label}.weight")


class DepthMuPNet(nn.Module):
    """input ``nn.Linear`` -> ``ResidualStack`` (or ``ResidualMLPStack``) -> readout, initialised and scaled
    as muP prescribes.

    With m_N = width / base_width: input weights have variance 1/in_features; the readout computes
    ``output(h / m_N)`` (mup's MuReadout multiplier), with output weights of standard deviation 1/base_width
    (or zeros with ``readout_zero_init``), so its effective weights have standard deviation 1/width at
    every width; biases start at zero. ``param_groups`` gives each part its learning rate, epsilon and
    weight decay (the table in docs/design.md §1.3).

    Args:
        in_features, width, depth, out_features: the sizes.
        readout_zero_init: initialise the output layer to zero.
        hidden_width: None for a ``ResidualStack``; an int m for a ``ResidualMLPStack`` of hidden width m.
        base_width: the width the hyperparameters were tuned at (default None: ``width``, no width scaling).
        **stack_kwargs: passed to the stack (activation, block, parametrization, backend, checkpoint, ...).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        *,
        readout_zero_init: bool = False,
        hidden_width: int | None = None,
        base_width: int | None = None,
        **stack_kwargs: Any,
    ) -> None:
        super().__init__()
        in_features = check_positive_int(in_features, "in_features")
        width = check_positive_int(width, "width")
        out_features = check_positive_int(out_features, "out_features")
        self.readout_zero_init = check_flag(readout_zero_init, "readout_zero_init")
        check_float_dtype(stack_kwargs.get("dtype"), "dtype")  # named here, before nn.Linear meets it
        factory = {key: stack_kwargs[key] for key in ("device", "dtype") if key in stack_kwargs}
        self.input = nn.Linear(in_features, width, **factory)
        self.stack: DepthScaledStack = (
            ResidualStack(width, depth, base_width=base_width, **stack_kwargs)
            if hidden_width is None
            else ResidualMLPStack(width, hidden_width, depth, base_width=base_width, **stack_kwargs)
        )
        self.output = nn.Linear(width, out_features, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.input.weight, std=1.0 / math.sqrt(self.input.in_features))
        nn.init.zeros_(self.input.bias)
        self.stack.reset_parameters()
        if self.readout_zero_init:
            nn.init.zeros_(self.output.weight)
        else:
            nn.init.normal_(self.output.weight, std=1.0 / self.stack.base_width)
        nn.init.zeros_(self.output.bias)

    def readout(self, h: Tensor) -> Tensor:
        """The output layer on the stack's output: ``output(h / m_N)``."""
        multiplier = self.stack.width_multiplier
        return self.output(h if multiplier == 1 else h / multiplier)

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, "x", self.input.in_features, "in_features")
        check_like(x, "x", self.input.weight, "input.weight", autocast=True)
        return self.readout(self.stack(self.input(x)))

    def extra_repr(self) -> str:
        p = self.stack.parametrization
        return (
            f"readout_zero_init={self.readout_zero_init}, base_width={self.stack.base_width}, base_depth={p.base_depth}"
        )
