"""torch.export -> AOTInductor -> Python and C++: the successor of the TorchScript route.

One package is compiled per run (the compile is the expensive part: tens of seconds of C++ on a CPU) and
shared by the tests: NystromAttention with the conv skip and a key padding mask, exported with a
dynamic sequence length, compiled and packaged by ``torch._inductor.aoti_compile_and_package``.

(i)   ``torch._inductor.aoti_load_package`` runs it in this process at lengths not seen at export
      (one batch element short enough for the op's exact path) and equals eager.
(ii)  A fresh process that never imports ``torch_nystrom`` (only ``torch.ops.load_library``) runs it;
      without the library it fails, naming the op.
(iii) The C++ example (``examples/cpp``, binary in ``NYSTROM_CPP_EXAMPLE``) runs it through
      ``torch::inductor::AOTIModelPackageLoader``, and reports a mismatch when the expected output is wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import rel_err

torch_nystrom = pytest.importorskip("torch_nystrom")
from torch.export import Dim, export  # noqa: E402

E, H, M, KERNEL = 32, 4, 8, 3
EXPORT_LENGTH = 40
# Lengths not seen at export; the second batch element of the 23-long case has 7 real tokens (< m: exact path).
CASES = ((57, 9), (23, 16))

FRESH_PROCESS = r"""
import sys
import torch

library, package, cases = sys.argv[1:4]
if library != "-":
    torch.ops.load_library(library)
runner = torch._inductor.aoti_load_package(package)
worst = 0.0
with torch.no_grad():
    for x, mask, expected in torch.load(cases)["cases"]:
        out = runner(x, key_padding_mask=mask)
        worst = max(worst, ((out - expected).abs().max() / expected.abs().max()).item())
assert "torch_nystrom" not in sys.modules, "the fresh process imported torch_nystrom"
print(f"worst relative error {worst:.3e}")
assert worst <= 1e-5, worst
"""


def _layer():
    torch.manual_seed(0)
    return torch_nystrom.NystromAttention(E, H, M, conv_kernel_size=KERNEL).eval()


def _batch(n, pad):
    """x (2, n, E) and a mask padding the last `pad` tokens of the second element."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, E, generator=g)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n - pad:] = True
    return x, mask


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(eager layer, path of the .pt2 package, path of a torch.save'd {"cases": [(x, mask, expected)]})."""
    layer = _layer()
    x, mask = _batch(EXPORT_LENGTH, 6)
    seq = Dim("seq", min=2, max=4096)
    ep = export(layer, (x,), {"key_padding_mask": mask}, dynamic_shapes={"x": {1: seq}, "key_padding_mask": {1: seq}})
    folder = tmp_path_factory.mktemp("aoti")
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(folder / "layer.pt2"))
    cases = []
    with torch.no_grad():
        for n, pad in CASES:
            xi, mi = _batch(n, pad)
            cases.append((xi, mi, layer(xi, key_padding_mask=mi)))
    cases_path = folder / "cases.pt"
    torch.save({"cases": cases}, str(cases_path))
    return layer, Path(path), cases_path


def test_package_runs_in_python_at_unseen_lengths(package):
    layer, path, _ = package
    assert path.is_file() and path.suffix == ".pt2"
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        for n, pad in CASES:
            x, mask = _batch(n, pad)
            out = runner(x, key_padding_mask=mask)
            expected = layer(x, key_padding_mask=mask)
            assert out.shape == (2, n, E)
            assert rel_err(out, expected) <= 1e-5, f"n={n}: {rel_err(out, expected):.3e}"
            # padded tokens get the output projection of zero, as in eager
            assert rel_err(out[1, n - pad:], layer.out_proj(torch.zeros(pad, E))) <= 1e-6


def _fresh(*args, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", FRESH_PROCESS, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_package_runs_in_fresh_process_with_only_the_library(package, tmp_path):
    _, path, cases = package
    proc = _fresh(torch_nystrom.library_path(), str(path), str(cases), cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "worst relative error" in proc.stdout
    missing = _fresh("-", str(path), str(cases), cwd=tmp_path)
    assert missing.returncode != 0, "the package ran without the op library"
    assert "nystrom" in missing.stderr, missing.stderr[-2000:]


def _example_binary() -> Path:
    path = os.environ.get("NYSTROM_CPP_EXAMPLE")
    if not path:
        pytest.skip("NYSTROM_CPP_EXAMPLE is not set: build examples/cpp (see examples/cpp/README.md)")
    binary = Path(path)
    assert binary.is_file() and os.access(binary, os.X_OK), f"NYSTROM_CPP_EXAMPLE={path} is not an executable"
    return binary


def test_cpp_example_runs_the_package(package, tmp_path):
    binary = _example_binary()
    _, path, cases = package
    proc = subprocess.run([str(binary), "--aoti", str(path), str(cases)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"{binary} exited with {proc.returncode}\n{output}"
    assert proc.stdout.count("max abs difference to Python") == len(CASES), output
    assert "MISMATCH" not in proc.stdout, output

    # A wrong expected output must fail the program.
    data = torch.load(str(cases))
    x, mask, expected = data["cases"][0]
    wrong = tmp_path / "wrong.pt"
    torch.save({"cases": [(x, mask, expected + 1e-3)]}, str(wrong))
    proc = subprocess.run([str(binary), "--aoti", str(path), str(wrong)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout, proc.stdout
