"""Scale: a very deep stack trains on the CPU path within its activation memory budget, and the kernels'
index arithmetic stays exact past 2^31 elements.

Huge rows (B*n > 2^31 elements) are not run here: one float32 tensor of that size is 8 GiB, and a
scaled_residual or stack call holds at least three (input, output, saved state), more than the shared
24 GiB test machine can spare. Instead, every offset into a flat buffer of the CPU stack kernel is
computed by the int64 helpers of csrc/cpu/stack_kernel.h (state_offset, mask_offset, weight_offset,
mask_words, stack_tile_rows), and test_index_helpers_past_2_to_the_31 compiles a small program against
that header and checks them at sizes past 2^31 and 2^32 against Python's exact integers. (The other
index products in csrc/cpu and csrc/cuda are int64 as well; scaled_residual's are row * n in int64.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dmup_kernels
from dmup_kernels import ResidualStack, param_groups, reference

from conftest import REPO, num_threads, rel_err, saved_bytes

CSRC = REPO / "csrc"
COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built")
def test_depth_8192_trains_one_step_within_saved_memory(seed):
    """L = 8192, n = 32, B = 16, relu: what autograd saves (parameters aside) is within 1.2x of the L
    layer inputs in float32, L*B*n*4 bytes; one Adam step lowers the loss; the output matches the
    float64 reference. One thread: with two, B = 16 is one row tile that the threads share by features,
    meeting at barriers three times per layer, which costs seconds on a busy 2-core machine and does not
    change the memory."""
    depth, width, batch = 8192, 32, 16
    with num_threads(1):
        stack = ResidualStack(width, depth, backend="cpp")
        x = torch.randn(batch, width)
        optimizer = torch.optim.Adam(param_groups(stack, lr=1e-2))

        def loss() -> torch.Tensor:
            return stack(x).square().mean()

        saved = saved_bytes(loss, exclude=[stack.weight])  # also runs the backward
        activations = depth * batch * width * 4
        assert activations <= saved <= 1.2 * activations, f"saved {saved} bytes, {saved / activations:.3f}x"
        grad = stack.weight.grad
        assert torch.isfinite(grad).all() and (grad != 0).any()
        with torch.no_grad():
            before = loss().item()
            optimizer.step()
            after = loss().item()
            assert after < before, (before, after)
            out = stack(x)
            expected = reference.residual_stack(x.double(), stack.weight.double(), scale=stack.scale)
        assert rel_err(out, expected) < 1e-4


INDEX_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>

#include "cpu/stack_kernel.h"

// argv: layer feature plane planes width batch threads; prints the helpers' values, one per line.
int main(int argc, char** argv) {
  if (argc != 8) return 2;
  int64_t a[7];
  for (int i = 0; i < 7; ++i) a[i] = std::strtoll(argv[i + 1], nullptr, 10);
  const int64_t layer = a[0], feature = a[1], plane = a[2], planes = a[3], width = a[4], batch = a[5];
  std::printf("%lld\n", static_cast<long long>(dmup::state_offset(layer, feature, width, batch)));
  std::printf("%lld\n", static_cast<long long>(dmup::mask_offset(layer, plane, feature, planes, width, batch)));
  std::printf("%lld\n", static_cast<long long>(dmup::weight_offset(layer, feature, width)));
  std::printf("%lld\n", static_cast<long long>(dmup::mask_words(batch)));
  const int64_t row_bytes = dmup::stack_tile_features(width) * 4;  // float32 planes
  std::printf("%lld\n", static_cast<long long>(dmup::stack_tile_rows(batch, row_bytes, a[6])));
  return 0;
}
"""


@pytest.fixture(scope="module")
def index_program(tmp_path_factory) -> Path:
    if COMPILER is None:
        pytest.skip("no C++ compiler on PATH")
    directory = tmp_path_factory.mktemp("index")
    source, program = directory / "index.cpp", directory / "index"
    source.write_text(INDEX_PROGRAM)
    command = [COMPILER, "-std=c++17", "-O1", "-fopenmp", f"-I{CSRC}", str(source), "-o", str(program)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return program


@pytest.mark.parametrize(
    "layer,feature,plane,planes,width,batch",
    [
        (8191, 511, 1, 2, 512, 2**20),  # the last row block of an (L, n, B) state of 2^42 elements
        (0, 2**16 - 1, 0, 1, 2**16, 2**16 + 3),  # one layer whose (n, B) block passes 2^32 elements
        (3, 46340, 0, 1, 46341, 7),  # n*n just past 2^31: the weight of one layer
        (2**20, 5, 1, 2, 48, 2**31 + 17),  # B past 2^31 rows
    ],
)
def test_index_helpers_past_2_to_the_31(index_program, layer, feature, plane, planes, width, batch):
    threads = 2
    args = [layer, feature, plane, planes, width, batch, threads]
    result = subprocess.run([str(index_program), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    state, mask, weight, words, tile_rows = map(int, result.stdout.split())
    expected_words = (batch + 15) // 16
    assert state == (layer * width + feature) * batch
    assert mask == ((layer * planes + plane) * width + feature) * expected_words
    assert weight == (layer * width + feature) * width
    assert words == expected_words
    assert max(state, mask, weight) >= 2**31  # the case does exercise the int64 range
    # a row tile: whole 16-row words of mask bits, within the cap that keeps four (n x R) float32 planes
    # in the default 512 KiB L2, and not split into needlessly small tiles (an overflowed per-thread
    # share would be)
    per_thread = -(-batch // threads)
    cap = max(16, 512 * 1024 // (16 * width) // 16 * 16)
    assert tile_rows % 16 == 0 and 16 <= tile_rows <= cap
    assert tile_rows >= min(per_thread, cap // 2)
