"""dmup_kernels: fused kernels for very deep, narrow residual networks under Depth-muP.

Functional ops (``scaled_residual``, ``residual_stack``, ``residual_mlp_stack``), drop-in modules
(``ScaledResidual``, ``ResidualStack``, ``ResidualMLPStack``, ``DepthMuPNet``), depth parametrizations and
optimizer param groups.
"""

from . import reference
from ._extension import HAS_CPP, cpu_isa
from .nn import (
    DepthMuPNet,
    DepthScaledStack,
    ReferenceBlock,
    ReferenceMLPBlock,
    ResidualMLPStack,
    ResidualStack,
    ScaledResidual,
)
from .ops import BACKENDS, residual_mlp_stack, residual_stack, scaled_residual
from .optim import param_groups
from .parametrization import COMPLETE_P, DEPTH_MUP, STANDARD, DepthParametrization

__all__ = [
    "BACKENDS",
    "COMPLETE_P",
    "DEPTH_MUP",
    "HAS_CPP",
    "STANDARD",
    "cpu_isa",
    "DepthMuPNet",
    "DepthParametrization",
    "DepthScaledStack",
    "ReferenceBlock",
    "ReferenceMLPBlock",
    "ResidualMLPStack",
    "ResidualStack",
    "ScaledResidual",
    "param_groups",
    "reference",
    "residual_mlp_stack",
    "residual_stack",
    "scaled_residual",
]
