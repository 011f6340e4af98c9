"""Autograd registration of the dmup ops in a form that torch.func transforms accept, shared by the C++
ops (dmup_kernels.ops) and the Triton ops (dmup_kernels.triton), which both import it: it sits below
them so that neither package imports the other for it.

Why not ``torch.library.register_autograd``: in torch 2.13 it wraps the rule in an
``autograd.Function`` whose ``forward(ctx, *args)`` calls ``setup_context`` itself, and
``autograd.Function.apply`` refuses such a Function while a torch.func transform is active ("it must
override the setup_context staticmethod"; open upstream as pytorch/pytorch#168393, #170834, #179652,
and ``torch.library.custom_op`` has the same problem). Giving the Function a separate
``setup_context`` is not enough on its own: under a transform, ``apply`` hands the Function to
functorch's ``custom_function_call``, which must be entered from above the functorch dispatch keys,
while an Autograd kernel runs below them ("could not find kernel for HigherOrderOperator
custom_function_call at dispatch key AutogradCPU").

What this does instead: behave like a C++ Autograd kernel. Under ``torch.func.grad`` the dispatcher
enters an op's Autograd kernel once per transform level, with that level's tensors; the kernel records
one graph node there and redispatches below Autograd, where functorch unwraps to the next level. The
Function here is a ``_SingleLevelFunction`` (the base of ``autograd.Function`` without the functorch
hand-off, which torch.func itself uses for this purpose), applied with
``enable_single_level_autograd_function`` -- the two private torch APIs this package relies on; the
tests of torch.func (tests/test_func_transforms.py) guard them.

The backward rules are first-order only: they call the ops' backward kernels, which have no derivative.
``backward_op`` gives such a kernel an Autograd rule that raises when it is differentiated, so a second
differentiation (``gradgradcheck``, ``create_graph=True`` then ``grad`` again, nested
``torch.func.grad``) fails with a RuntimeError naming the op instead of returning a gradient with its
second-order term silently missing. It raises only then: ``torch.func.grad`` always records the graph
of the gradients (``create_graph=True``), so raising on that alone would break first-order use.

There are no forward-mode rules either (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``,
``hessian``, ``linearize``): an op raises when forward-mode AD may run through it, instead of returning an
output without a tangent, which those transforms would read as a zero derivative. That is when an input
carries a tangent, or when a torch.func forward-mode transform is active at all: below the Autograd
kernel of a reverse-mode level (``hessian`` is jacfwd of jacrev), forward grad mode is off, so the
tangents of an outer jvp level are not visible on the inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction

from ._checks import check_activation, check_scale
from ._layout import EpilogueSettings

_LIBRARY = torch.library.Library("dmup", "IMPL")  # kept alive: dropping it would unregister the kernels


def register_autograd(qualname: str, backward: Callable, *, setup_context: Callable, backward_op: str) -> None:
    """Registers ``backward`` / ``setup_context`` (the ``torch.library.register_autograd`` contract) as
    the Autograd kernel of the op ``qualname`` ("dmup::name"), usable under torch.func transforms.
    ``backward`` returns the gradients of the op's leading inputs; the inputs after them (the settings)
    get None.

    ``backward_op`` is the op that ``backward`` computes the gradients with; differentiating it raises.
    """

    def double_backward(ctx: Any, *grads: Tensor) -> None:
        raise RuntimeError(
            f"double backward through {qualname} is not supported: its gradient ({backward_op}) has no "
            f"derivative; use backend='reference' for higher-order gradients"
        )

    _register(qualname, backward, setup_context)
    _register(backward_op, double_backward, lambda ctx, inputs, output: None)


def _register(qualname: str, backward: Callable, setup_context: Callable) -> None:
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    def below_autograd(*args: Any) -> Any:
        # Skips this Autograd kernel; under torch.func.grad the call goes on to the next transform level.
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward(*args: Any) -> Any:
        # apply() runs forward with grad mode off; the next transform level must record its node too.
        with torch.enable_grad():
            return below_autograd(*args)

    def setup_without_zero_gradients(ctx: Any, inputs: tuple, output: Any) -> None:
        # The state outputs (saved states, sign bits) are non-differentiable; materialised, their
        # gradients would be zeros as large as the state, allocated and filled in every backward.
        ctx.set_materialize_grads(False)
        ctx.input_count = len(inputs)
        setup_context(ctx, inputs, output)

    def backward_of_defined(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        # Unmaterialised, undefined output gradients arrive as None; with none defined there is nothing to do.
        input_grads = () if all(grad is None for grad in grads) else tuple(backward(ctx, *grads))
        return input_grads + (None,) * (ctx.input_count - len(input_grads))

    function = type(
        f"{namespace}_{name}",
        (_SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_without_zero_gradients),
            "backward": staticmethod(backward_of_defined),
        },
    )

    def autograd_kernel(*args: Any) -> Any:
        if _forward_mode_may_run(args):
            raise RuntimeError(
                f"forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) through {qualname} "
                f"is not supported; use backend='reference' for it, or reverse mode (torch.func.jacrev, vjp)"
            )
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            with enable_single_level_autograd_function():
                return function.apply(*args)
        return below_autograd(*args)

    with warnings.catch_warnings():
        # A custom_op / triton_op (the Triton kernels) comes with an Autograd kernel; this one replaces it
        # (torch 2.11 refuses to unless told allow_override=True, which 2.13 assumes).
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        _LIBRARY.impl(name, autograd_kernel, "Autograd", allow_override=True)


def _forward_mode_may_run(args: tuple) -> bool:
    """Whether forward-mode AD may run through an op called with ``args`` (see the module's docstring)."""
    if forward_ad._current_level < 0:  # no dual level entered: the cheap common case, a few ns per op call
        return False
    if any(interpreter.key() == TransformType.Jvp for interpreter in retrieve_all_functorch_interpreters()):
        return True
    return any(isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


class OpEpilogue:
    """The backend of scaled_residual whose kernels are the op ``op`` (x, branch_out, scale, activation,
    mean_subtract) -> out and ``backward_op`` (grad_out, branch_out, scale, activation, mean_subtract) ->
    grad_branch_out. Creating it registers the fake (shape) rules of both and the autograd rule of
    ``op``, which calls ``backward``."""

    def __init__(self, op: str, backward_op: str) -> None:
        self.names = op.removeprefix("dmup::"), backward_op.removeprefix("dmup::")

        def fake(x: Tensor, branch_out: Tensor, scale: float, activation: str, mean_subtract: bool) -> Tensor:
            # What the kernels check (torch.compile and meta tensors run only this rule); the backward op's
            # first argument is grad_out.
            torch._check_value(x.shape == branch_out.shape, lambda: f"{op}: its two tensors must have one shape")
            torch._check_type(x.dtype == branch_out.dtype, lambda: f"{op}: its two tensors must have one dtype")
            torch._check_value(x.device == branch_out.device, lambda: f"{op}: its two tensors must be on one device")
            torch._check_type(
                x.dtype.is_floating_point, lambda: f"{op}: its tensors must be floating point; got {x.dtype}"
            )
            torch._check_value(x.dim() >= 1, lambda: f"{op}: its tensors must have at least 1 dimension")
            check_scale(scale)
            check_activation(activation)
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        torch.library.register_fake(op)(fake)
        torch.library.register_fake(backward_op)(fake)

        def setup_context(ctx, inputs, output) -> None:
            _, branch_out, *settings = inputs
            ctx.settings = EpilogueSettings(*settings)
            # phi' reads branch_out; the identity's gradient, s MS(grad_out), does not, and then nothing is kept
            # (as eager's x + s * MS(branch_out) keeps nothing).
            ctx.save_for_backward(None if ctx.settings.activation == "identity" else branch_out)

        def backward(ctx, grad_out: Tensor):
            (branch_out,) = ctx.saved_tensors
            # For the identity, grad_out stands in for branch_out, whose values the kernels do not read then.
            return self.backward(grad_out, grad_out if branch_out is None else branch_out, ctx.settings)

        register_autograd(op, backward, setup_context=setup_context, backward_op=backward_op)

    @property
    def op(self) -> Any:
        """The forward op, looked up on each use (as torch.ops.dmup.<name> is, so wrappers of it apply)."""
        return getattr(torch.ops.dmup, self.names[0])

    def forward(self, x: Tensor, branch_out: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        return self.op(x, branch_out, *settings), branch_out

    def backward(self, grad_out: Tensor, state: Tensor, settings: EpilogueSettings) -> tuple[Tensor, Tensor]:
        return grad_out, getattr(torch.ops.dmup, self.names[1])(grad_out, state, *settings)
