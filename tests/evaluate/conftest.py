"""Evaluation tests run single-threaded: their tensors are tiny, and on a shared 2-core machine
OpenMP's second thread costs far more in synchronization than it gains (10× slower steps seen)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
