"""The contract between the stack ops (residual_stack, residual_mlp_stack) and their backends, and what the
fused stacks save for the derivative of phi (docs/design.md §3.7, §4); also RecordedMlpStack, the eager MLP
stack that the reference and the Triton backend both run. It sits below dmup_kernels.ops and
dmup_kernels.triton, which both import it.

One vocabulary for every backend: ``states`` are the residual-stream states x^0..x^L (or the part of
them a kernel keeps), ``signs`` the saved sign bits of h, ``sign_planes`` their planes per element.
The C++ ops' schemas call the same tensors ``saved`` and ``mask``, and csrc the count ``mask_planes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import reference

SIGN_WORD_BITS = 16
"""Rows per word of the C++ ops' sign bits: they are int16, bit r % 16 of word r // 16 is row r."""


def sign_words(batch: int) -> int:
    """Words per feature and plane of the C++ ops' sign bits for ``batch`` rows: ceil(batch / 16)."""
    return (batch + SIGN_WORD_BITS - 1) // SIGN_WORD_BITS


def sign_planes(activation: str, block: str) -> int:
    """Sign-bit planes saved per element of a "post" block: relu keeps [not h <= 0] (torch's relu
    gradient passes where h is NaN), abs keeps [h > 0] and [h < 0]; the "pre" block and the smooth
    activations keep none."""
    return {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0


def saved_layers(depth: int, checkpoint_every: int) -> int:
    """Layers of the state a stack op saves: every layer's input (``checkpoint_every`` 0) or ceil(L / k)
    checkpoints (docs/design.md §4.4)."""
    return -(-depth // checkpoint_every) if checkpoint_every else depth


def check_checkpoint_every(every: int) -> None:
    """The checkpoint spacing of the C++ stack ops (csrc/op_args.h), for their fake rules: 0 or a layer count."""
    torch._check_value(every >= 0, lambda: f"checkpoint_every must be 0 (save every layer) or >= 1; got {every}")


def check_stack_rows(x: Tensor, x_name: str, **params: Tensor | None) -> None:
    """What the C++ stack ops take (csrc/op_args.h), for their fake rules: rows ``x`` (batch, width) in
    float32 or float64, and each of ``params`` (None: absent) in x's dtype. The functions also take
    (..., width) and autocast's mixed dtypes, which ``compute_rows`` turns into this before calling the ops."""
    torch._check_value(x.dim() == 2, lambda: f"{x_name} must be 2-D (batch, width); got shape {tuple(x.shape)}")
    torch._check_type(
        x.dtype in (torch.float32, torch.float64),
        lambda: f"{x_name} must be float32 or float64 for the stack kernels; got {x.dtype}",
    )
    for name, param in params.items():
        if param is not None:
            torch._check_type(
                param.dtype == x.dtype,
                lambda name=name, param=param: f"{name} must have the dtype of {x_name} ({x.dtype}); got {param.dtype}",
            )


def stack_state_shapes(
    x: Tensor, depth: int, planes: int, features: int, every: int, save: bool = True
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the state a stack op saves for rows ``x`` (batch, width), as the C++ ops allocate and
    check it (csrc/op_args.h): ``saved`` (saved_layers, width, batch) and ``mask`` (layers, planes, features,
    ceil(batch / 16)), the mask without layers under checkpoints (``every`` >= 1); both without layers when
    nothing is saved."""
    batch, width = x.shape
    kept = saved_layers(depth, every) if save else 0
    masked = depth if save and not every else 0
    return (kept, width, batch), (masked, planes, features, sign_words(batch))


def fake_stack_outputs(
    x: Tensor, depth: int, planes: int, features: int, save: bool, every: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The outputs of a stack op's fake rule: ``out`` of x's shape and the state (``stack_state_shapes``),
    unfilled."""
    check_checkpoint_every(every)
    saved_shape, mask_shape = stack_state_shapes(x, depth, planes, features, every, save)
    return x.new_empty(x.shape), x.new_empty(saved_shape), x.new_empty(mask_shape, dtype=torch.int16)


def check_fake_stack_state(
    op: str, grad_out: Tensor, saved: Tensor, signs: Tensor, depth: int, planes: int, features: int, every: int
) -> None:
    """The check of the saved state the C++ backward ops make (csrc/op_args.h), for their fake rules, which
    are all that torch.compile and meta tensors run: ``saved`` and ``signs`` of ``stack_state_shapes``, of
    grad_out's dtype and int16, on grad_out's device, for a forward of ``op`` with ``checkpoint_every`` =
    ``every``."""
    check_checkpoint_every(every)
    saved_shape, mask_shape = stack_state_shapes(grad_out, depth, planes, features, every)
    expected = {"saved": (saved, saved_shape, grad_out.dtype), "mask": (signs, mask_shape, torch.int16)}
    for name, (state, shape, dtype) in expected.items():
        torch._check_value(
            tuple(state.shape) == shape,
            lambda name=name, state=state, shape=shape: (
                f"{name} (returned by {op}) must have shape {shape}; got {tuple(state.shape)}"
            ),
        )
        torch._check_type(
            state.dtype == dtype,
            lambda name=name, state=state, dtype=dtype: f"{name} must be {dtype}; got {state.dtype}",
        )
        torch._check_value(
            state.device == grad_out.device,
            lambda name=name, state=state: (
                f"{name} must be on the device of grad_out ({grad_out.device}); got {state.device}"
            ),
        )


class EpilogueSettings(NamedTuple):
    """The non-tensor arguments of the scaled_residual ops, in their schemas' order."""

    scale: float
    activation: str
    mean_subtract: bool


class EpilogueBackend(Protocol):
    """One backend of scaled_residual: out = x + scale * MS(phi(branch_out)) and its backward. The state
    is what the backward reads: branch_out."""

    def forward(self, x: Tensor, branch_out: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        """(out, state) for x and branch_out of one shape (..., n) and dtype."""
        ...

    def backward(self, grad_out: Tensor, state: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        """(grad_x, grad_branch_out) for grad_out = dLoss/d(out): grad_out and phi'(branch_out) * MS(scale
        * grad_out)."""
        ...


class StackSettings(NamedTuple):
    """The non-tensor arguments of the residual_stack ops, in their schemas' order."""

    scale: float
    activation: str
    block: str
    mean_subtract: bool
    checkpoint_every: int = 0
    """0: the forward saves every layer's input for the backward; k >= 1: only x_0, x_k, x_2k, ..., and the
    backward recomputes the rest (docs/design.md §4.4)."""

    @property
    def layer(self) -> tuple[float, str, str, bool]:
        """What every layer shares: (scale, activation, block, mean_subtract)."""
        return self.scale, self.activation, self.block, self.mean_subtract

    @property
    def layer_options(self) -> dict[str, Any]:
        """``layer`` by name, as dmup_kernels.reference.residual_stream takes it."""
        return dict(zip(("scale", "activation", "block", "mean_subtract"), self.layer))


StackGrads = tuple[Tensor, Tensor, "Tensor | None"]
"""(grad_x, grad_weight, grad_bias) of a stack; grad_bias is None without bias."""


class StackBackend(Protocol):
    """One backend of residual_stack: its forward, its backward, and the states for ``return_states``.

    Autograd calls ``backward`` through the autograd rule of the op ``forward`` runs (the eager
    reference is differentiated by autograd itself, and its ``backward`` does the same)."""

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, settings: StackSettings, save: bool
    ) -> tuple[Tensor, Any]:
        """The output for ``x`` of shape (..., n) in x's dtype, and the backend's state. ``save``: keep
        what ``backward`` and ``states`` need (otherwise neither may be used)."""
        ...

    def backward(
        self, grad_out: Tensor, state: Any, weight: Tensor, bias: Tensor | None, settings: StackSettings
    ) -> StackGrads:
        """The gradients of the forward that returned ``state``, given ``grad_out`` = dLoss/d(output)."""
        ...

    def states(self, state: Any, x: Tensor, out: Tensor) -> Tensor:
        """The states x^0..x^L of a forward with ``checkpoint_every`` 0 that returned ``state`` and
        ``out``, shape (L + 1, ..., n), x's dtype, detached."""
        ...


class MlpStackSettings(NamedTuple):
    """The non-tensor arguments of the residual_mlp_stack ops, in their schemas' order."""

    scale: float
    activation: str
    mean_subtract: bool
    checkpoint_every: int = 0
    """As in StackSettings: 0 saves every layer's input, k >= 1 only x_0, x_k, x_2k, ..."""

    @property
    def layer(self) -> tuple[float, str, bool]:
        """What every layer shares: (scale, activation, mean_subtract)."""
        return self.scale, self.activation, self.mean_subtract

    @property
    def layer_options(self) -> dict[str, Any]:
        """``layer`` by name, as dmup_kernels.reference.residual_mlp_stream takes it."""
        return dict(zip(("scale", "activation", "mean_subtract"), self.layer))


class MlpWeights(NamedTuple):
    """The parameters of a stack of MLP blocks (docs/design.md §2.5): weight1 (L, m, n), weight2 (L, n, m),
    bias1 (L, m) or None, bias2 (L, n) or None."""

    weight1: Tensor
    weight2: Tensor
    bias1: Tensor | None
    bias2: Tensor | None


MlpStackGrads = tuple[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"]
"""(grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2) of an MLP stack; a bias's is None without it."""


class MlpStackBackend(Protocol):
    """One backend of residual_mlp_stack, with the contract of StackBackend: its forward, its backward, and
    the states for ``return_states``."""

    def forward(self, x: Tensor, weights: MlpWeights, settings: MlpStackSettings, save: bool) -> tuple[Tensor, Any]:
        """The output for ``x`` of shape (..., n) in x's dtype, and the backend's state. ``save``: keep
        what ``backward`` and ``states`` need (otherwise neither may be used)."""
        ...

    def backward(self, grad_out: Tensor, state: Any, weights: MlpWeights, settings: MlpStackSettings) -> MlpStackGrads:
        """The gradients of the forward that returned ``state``, given ``grad_out`` = dLoss/d(output)."""
        ...

    def states(self, state: Any, x: Tensor, out: Tensor) -> Tensor:
        """The states x^0..x^L of a forward with ``checkpoint_every`` 0 that returned ``state`` and
        ``out``, shape (L + 1, ..., n), x's dtype, detached."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for tensors of ``dtype``: float32 or float64 (half types run with a
    float32 residual stream)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def compute_rows(x: Tensor, *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """The kernels' operands: x as rows (B, n) and the parameters (None stays None), all in
    ``compute_dtype``."""
    compute = compute_dtype(x.dtype)
    return x.reshape(-1, x.shape[-1]).to(compute), *(None if p is None else p.to(compute) for p in params)


def stacked_states(states: Sequence[Tensor], x: Tensor) -> Tensor:
    """``states`` (each of x's shape, or rows (B, n)) stacked into shape (L + 1, ..., n), x's dtype, detached."""
    return torch.stack([state.detach().to(x.dtype).reshape(x.shape) for state in states])


def graph_backward(grad_out: Tensor, stream: Sequence[Tensor], *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward of a forward that autograd recorded, from its first state ``stream[0]`` (x) to its
    last (the output): the gradients of x and of each of ``params`` that requires grad, None for the
    others (and for the params that are None)."""
    inputs = (stream[0], *params)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(stream[-1], wanted, grad_out))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def checkpointed_stream(
    run_segment: Callable[..., Tensor], x: Tensor, params: Sequence[Tensor | None], every: int
) -> list[Tensor]:
    """x_0, x_k, x_2k, ..., x_L (k = ``every``) of a stack run segment by segment, ``run_segment(x_first,
    *params_segment)`` under ``torch.utils.checkpoint``, where each of ``params`` (per-layer tensors of
    shape (L, ...), or None) is cut into segments of k layers: autograd keeps only the segments' inputs and
    recomputes each segment in the backward (docs/design.md §4.4), for the backends without checkpoints of
    their own. Under a torch.func transform, which does not support the saved-tensor hooks
    torch.utils.checkpoint works by, the segments run plainly (same result, every state kept)."""
    if torch._C._are_functorch_transforms_active():
        return [x, run_segment(x, *params)]
    # split, not slices: the backward of a slice writes a full-size gradient per segment.
    depth = next(p for p in params if p is not None).shape[0]
    segments = saved_layers(depth, every)
    pieces = [[None] * segments if p is None else p.split(every) for p in params]
    stream = [x]
    for segment_params in zip(*pieces):
        stream.append(checkpoint(run_segment, stream[-1], *segment_params, use_reentrant=False))
    return stream


class RecordedMlpStack:
    """A backend of residual_mlp_stack of eager MLP blocks (``reference.mlp_block``) whose output epilogue is
    ``epilogue``, the reference's or a kernel's, recorded by autograd: its state is the stream x^0..x^L (x^0,
    x^k, ..., x^L with checkpoints, the segments under ``torch.utils.checkpoint``), which ``backward``
    differentiates. With ``kernel_operands`` the blocks run on the kernels' operands (``compute_rows``: rows,
    half types in float32); otherwise on the tensors as given (the eager reference, in their own dtype)."""

    def __init__(self, epilogue: reference.Epilogue = reference.scaled_residual, kernel_operands: bool = False) -> None:
        self.epilogue = epilogue
        self.kernel_operands = kernel_operands

    def forward(
        self, x: Tensor, weights: MlpWeights, settings: MlpStackSettings, save: bool
    ) -> tuple[Tensor, list[Tensor]]:
        def stream(x: Tensor, *weights: Tensor | None) -> list[Tensor]:
            return reference.residual_mlp_stream(x, *weights, **settings.layer_options, epilogue=self.epilogue)

        first, *operands = compute_rows(x, *weights) if self.kernel_operands else (x, *weights)
        if save and settings.checkpoint_every:
            states = checkpointed_stream(lambda *args: stream(*args)[-1], first, operands, settings.checkpoint_every)
        else:
            states = stream(first, *operands)
        return states[-1].to(x.dtype).reshape(x.shape), states

    def backward(
        self, grad_out: Tensor, state: list[Tensor], weights: MlpWeights, settings: MlpStackSettings
    ) -> MlpStackGrads:
        grad_x, *grads = graph_backward(grad_out.reshape(state[-1].shape).to(state[-1].dtype), state, *weights)
        return None if grad_x is None else grad_x.reshape(grad_out.shape), *grads

    def states(self, state: list[Tensor], x: Tensor, out: Tensor) -> Tensor:
        return stacked_states(state, x)
