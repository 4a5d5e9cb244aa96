"""Shared pytest fixtures (keep this file small; add fixtures only when several test files need them)."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore the setting.

    The library tests push many tiny tensors through small networks: extra threads buy nothing there,
    and on a busy 2-core machine their synchronisation made these tests ~6x slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
