"""Shared fixtures for the tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny convolutions on a shared 2-core machine run several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
