"""What the fused stacks save for the derivative of phi, shared by the C++ and Triton ops' rules."""


def sign_planes(activation: str, block: str) -> int:
    """Sign-bit planes saved per element of a "post" block: relu keeps [not h <= 0] (torch's relu
    gradient passes where h is NaN), abs keeps [h > 0] and [h < 0]; the "pre" block and the smooth
    activations keep none."""
    return {"relu": 1, "abs": 2}.get(activation, 0) if block == "post" else 0
