"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: on a busy 2-core machine two threads made some tests
    up to ~100x slower (OpenMP barrier spinning); results are the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
