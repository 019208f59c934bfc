"""pytest configuration of the Python tests of torch-nystrom: import path, markers, seeding."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Make `reference` and `helpers` importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")


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
