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


@pytest.fixture
def saved_bytes():
    """saved_bytes(fn, *args) -> (fn(*args), bytes of the distinct storages autograd saved for backward
    while it ran; they stay alive with the graph, so no address is counted twice)."""
    def measure(fn, *args, **kwargs):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args, **kwargs)
        return out, sum(saved.values())
    return measure
