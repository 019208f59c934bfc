"""pytest configuration of the Python tests of torch-nystrom: import path, markers, seeding, devices.

A test that takes the ``device`` fixture runs once per device of ``helpers.devices()`` (ids "cpu", "cuda", and
"emu", the CUDA backend under the CPU emulation of the CUDA execution model, when asked for):
NYSTROM_TEST_DEVICE unset, the CPU and, when torch sees one, the GPU; set (comma-separated names), exactly
those. A listed device that is not available fails the tests that use it, never skips them. A test that takes
``cuda_device`` runs on the devices among them that run the CUDA backend, and is skipped, saying so, when
there is none.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Make `reference`, `helpers` and `cases` importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")
    try:
        helpers.devices()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    return f"torch-nystrom test devices: {', '.join(helpers.devices())} ({helpers.ENV_DEVICE}=" \
           f"{os.environ.get(helpers.ENV_DEVICE, '')!r})"


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        names = helpers.devices()
        metafunc.parametrize("device", names, ids=names, indirect=True, scope="session")
    if "cuda_device" in metafunc.fixturenames:
        names = [n for n in helpers.devices() if helpers.DEVICES[n].cuda_backend]
        if names:
            metafunc.parametrize("cuda_device", names, ids=names, indirect=True, scope="session")
        else:
            reason = (f"no device that runs the CUDA backend among the test devices ({', '.join(helpers.devices())}; "
                      f"torch.cuda.is_available() is {torch.cuda.is_available()}; {helpers.ENV_DEVICE}=cuda "
                      "makes a missing GPU an error)")
            metafunc.parametrize("cuda_device", [pytest.param(None, marks=pytest.mark.skip(reason=reason))],
                                 ids=["no_cuda_backend"], indirect=True, scope="session")


def pytest_sessionfinish(session, exitstatus):
    # The kernels this run launched on the emulated backend, for scripts/test_emulated.sh's coverage check.
    log = os.environ.get("NYSTROM_EMU_KERNEL_LOG")
    if log and helpers.emulated_library():
        with open(log, "a") as f:
            f.write(torch.ops.nystrom._emulator("kernels"))


def pytest_collection_modifyitems(config, items):
    # With the emulated CUDA backend loaded (scripts/test_emulated.sh), CPU tensors go to the CUDA glue and
    # kernels: only the per-device tests, which know which backend serves them, run in such a process.
    if not helpers.emulated_library():
        return
    skip = pytest.mark.skip(reason="not a per-device test: it runs on the CPU backend, and this process loaded "
                                   "the emulated CUDA backend instead (NYSTROM_LIBRARY)")
    for item in items:
        if not {"device", "cuda_device"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


def _device_fixture(request):
    try:
        return helpers.device(request.param)
    except helpers.DeviceUnavailable as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def device(request):
    """The helpers.Device the test runs on."""
    return _device_fixture(request)


@pytest.fixture(scope="session")
def cuda_device(request):
    """A helpers.Device that runs the CUDA backend."""
    return _device_fixture(request)


@pytest.fixture(autouse=True)
def _emulator_state():
    """With the emulated CUDA backend, a fault inside a kernel is sticky (as on a GPU: every later call fails);
    the test that caused it fails, and the next test starts from a reset emulator."""
    yield
    if helpers.emulated_library():
        torch.ops.nystrom._emulator("reset")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny problems: one intra-op thread is fastest, and immune to a busy shared machine.

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
