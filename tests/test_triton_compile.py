"""The Triton kernels compile for sm_80 and sm_90 (tests/triton_aot.py, no GPU needed): the GPU compile
path the interpreter never takes. Checks that every kernel the launchers use compiles for both targets in
every dtype (bfloat16 and float16 with every activation), that every launch fits the shared-memory
budget and the stack and MLP kernels' shared-memory estimates, that the pinned configs of the epilogue
kernel, the depth-fused stack (n <= 256), the depth-fused MLP stack (n <= 128, within
``allowed_stack_bytes``) and the dW GEMM spill no registers, and that loads and stores are 16-byte wide
wherever the width allows it. The compile takes about 4 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from dmup_kernels.triton import HAS_TRITON
from dmup_kernels.triton.residual_mlp_stack import _mlp_shared_bytes
from dmup_kernels.triton.residual_stack import DEPTH_FUSED_MAX_WIDTH, _stack_shared_bytes
from dmup_kernels.triton.tuning import SHARED_MEMORY_BUDGET

TARGETS = ("sm_80", "sm_90")
KERNELS = {
    "scaled_residual_kernel",
    "stack_forward_kernel",
    "stack_backward_kernel",
    "stack_weight_grad_kernel",
    "mlp_stack_forward_kernel",
    "mlp_stack_backward_kernel",
}
ACTIVATIONS = {"relu", "abs", "gelu", "silu", "identity"}
ITEMSIZE = {"*fp64": 8, "*fp32": 4, "*bf16": 2, "*fp16": 2}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(DMUP_AUTOTUNE="0", TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).with_name("triton_aot.py")
    result = subprocess.run(
        [sys.executable, str(script), *TARGETS], capture_output=True, text=True, env=env, timeout=900,
        cwd=script.parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_kernel_compiles_for_every_target(compiled):
    for target in TARGETS:
        assert {record["kernel"] for record in compiled if record["target"] == target} == KERNELS
    per_target = {target: sum(record["target"] == target for record in compiled) for target in TARGETS}
    assert len(set(per_target.values())) == 1, per_target


def test_every_kernel_compiles_in_half_precision_with_every_activation(compiled):
    for pointer in ("*bf16", "*fp16"):
        half = [r for r in compiled if pointer in r["signature"].values()]
        covered = {(r["kernel"], r["constexprs"]["ACT"]) for r in half if "ACT" in r["constexprs"]}
        assert covered == {(kernel, act) for kernel in KERNELS for act in ACTIVATIONS}, pointer


def test_stack_shared_memory_estimate_bounds_the_compiled_size(compiled):
    for r in compiled:
        if r["kernel"] in ("stack_forward_kernel", "stack_backward_kernel"):
            config = triton.Config({"BLOCK_M": r["constexprs"]["BLOCK_M"], "BLOCK_K": r["constexprs"]["BLOCK_K"]},
                                   num_warps=r["num_warps"], num_stages=r["num_stages"])  # fmt: skip
            itemsize = ITEMSIZE[next(t for t in r["signature"].values() if t in ITEMSIZE)]
            arch = int(r["target"].removeprefix("sm_"))
            assert (
                _stack_shared_bytes(config, r["constexprs"]["BLOCK_N"], itemsize, arch) >= r["dynamic_shared_bytes"]
            ), r


def test_mlp_shared_memory_estimate_bounds_the_compiled_size(compiled):
    for r in compiled:
        if r["kernel"] in ("mlp_stack_forward_kernel", "mlp_stack_backward_kernel"):
            config = triton.Config({"BLOCK_M": r["constexprs"]["BLOCK_M"], "BLOCK_H": r["constexprs"]["BLOCK_H"]},
                                   num_warps=r["num_warps"], num_stages=r["num_stages"])  # fmt: skip
            itemsize = ITEMSIZE[r["signature"]["x_ptr"]]
            assert _mlp_shared_bytes(config, r["constexprs"]["BLOCK_N"], itemsize) >= r["dynamic_shared_bytes"], r


def test_shared_memory_within_budget(compiled):
    """The budget (96 KiB) fits every GPU from sm_80 on; a launch over it fails only when loaded on a device."""
    over = [(r["kernel"], r["target"], r["constexprs"], r["dynamic_shared_bytes"]) for r in compiled
            if r["dynamic_shared_bytes"] > SHARED_MEMORY_BUDGET]  # fmt: skip
    assert not over


def allowed_stack_bytes(record: dict) -> int:
    """The stack frames measured and tolerated. ptxas gives some tiles an 8-byte frame with no local memory
    (half-precision weight-gradient tiles, silu, 32 or 64 square, sm_80 and sm_90; some MLP-stack launches);
    the MLP backward of gelu and silu in float32 at n = 128 (four row tiles and the recomputed h1, operands
    split in three for tf32x3) spills 64-120 bytes. A GPU run should tell whether they cost anything."""
    kernel, constexprs = record["kernel"], record["constexprs"]
    if kernel == "stack_weight_grad_kernel" and record["signature"].get("grad_w_ptr") in ("*fp16", "*bf16"):
        return 8
    if kernel == "mlp_stack_backward_kernel" and constexprs["ACT"] in ("gelu", "silu") and constexprs["BLOCK_N"] > 64:
        return 128 if record["signature"]["x_ptr"] == "*fp32" else 8
    return 8 if kernel.startswith("mlp_stack") else 0


def test_no_register_spills_up_to_the_depth_fused_width(compiled):
    """The fused-block launches (n > 256) keep a full-width row tile and may spill; nothing else may beyond
    ``allowed_stack_bytes``."""
    checked = [r for r in compiled if r["constexprs"].get("BLOCK_N", 0) <= DEPTH_FUSED_MAX_WIDTH]
    assert {r["kernel"] for r in checked} == KERNELS
    spilling = [
        (r["kernel"], r["target"], r["constexprs"], r["stack_bytes"])
        for r in checked
        if r["stack_bytes"] > allowed_stack_bytes(r)
    ]
    assert not spilling


def test_sixteen_byte_global_accesses(compiled):
    """Rows whose width is a multiple of 16 are loaded and stored 16 bytes at a time (the two-pass epilogue
    sample has n = 9000, which is not)."""
    aligned = [r for r in compiled if not r["constexprs"].get("TWO_PASS", False)]
    narrow = [
        (r["kernel"], r["target"], r["constexprs"]) for r in aligned if not (r["vector_loads"] and r["vector_stores"])
    ]
    assert not narrow
