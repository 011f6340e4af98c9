"""Without the compiled extension the package imports, warns once and runs on the reference backend.

Runs in a fresh interpreter in which ``dmup_kernels._C`` cannot be imported
(``sys.modules["dmup_kernels._C"] = None`` makes ``import dmup_kernels._C`` raise ImportError).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, warnings
    import torch  # imported first so that only warnings from dmup_kernels are recorded below

    sys.modules["dmup_kernels._C"] = None  # the extension is now unimportable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dmup_kernels
    result = {
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "has_cpp": dmup_kernels.HAS_CPP,
        "op_registered": hasattr(torch.ops.dmup, "scaled_residual"),
    }
    from dmup_kernels import reference

    torch.manual_seed(0)
    x, b = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        auto = dmup_kernels.scaled_residual(x, b, 0.5, "gelu", True)
        ref = reference.scaled_residual(x, b, 0.5, "gelu", True)
        result["auto_equal"] = bool(torch.equal(auto, ref))
        result["auto_nonzero_diff_from_x"] = bool((auto - x).abs().max() > 0)

        stack = dmup_kernels.ResidualStack(12, 3, dtype=torch.float64)  # backend "auto"
        xs = x.clone().requires_grad_()
        out = stack(xs)
        out.sum().backward()
        expected = reference.residual_stack(x, stack.weight.detach(), scale=stack.scale)
        result["stack_auto_equal"] = bool(torch.equal(out.detach(), expected))
        result["stack_grad_finite"] = bool(torch.isfinite(xs.grad).all())
    result["later_warnings"] = [str(w.message) for w in later]

    def error_of(call):
        try:
            call()
        except Exception as error:  # noqa: BLE001
            return [type(error).__name__, str(error)]
        return None

    result["cpp_error"] = error_of(lambda: dmup_kernels.scaled_residual(x, b, 0.5, backend="cpp"))
    cpp_stack = dmup_kernels.ResidualStack(12, 3, backend="cpp", dtype=torch.float64)
    result["cpp_stack_error"] = error_of(lambda: cpp_stack(x))
    result["cpp_functional_stack_error"] = error_of(
        lambda: dmup_kernels.residual_stack(x, cpp_stack.weight, scale=0.5, backend="cpp")
    )
    print("RESULT=" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def fallback() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0][len("RESULT=") :])


def test_import_warns_exactly_once(fallback):
    runtime = [message for category, message in fallback["warnings"] if category == "RuntimeWarning"]
    assert len(runtime) == 1, fallback["warnings"]
    assert "reference" in runtime[0] and "dmup_kernels" in runtime[0]
    assert "\n" not in runtime[0].strip()  # one line
    assert fallback["later_warnings"] == []  # running ops does not warn again


def test_has_cpp_false(fallback):
    assert fallback["has_cpp"] is False
    assert fallback["op_registered"] is False


def test_auto_backend_is_reference(fallback):
    assert fallback["auto_equal"] is True
    assert fallback["auto_nonzero_diff_from_x"] is True
    assert fallback["stack_auto_equal"] is True
    assert fallback["stack_grad_finite"] is True


@pytest.mark.parametrize("key", ["cpp_error", "cpp_stack_error", "cpp_functional_stack_error"])
def test_cpp_backend_raises_clear_error(fallback, key):
    error = fallback[key]
    assert error is not None, "backend='cpp' ran without the extension"
    name, message = error
    assert name == "RuntimeError"
    assert "cpp" in message and ("extension" in message or "_C" in message)
