"""Fixtures shared by the package's tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one intra-op thread, restored afterwards.

    The models are tiny: one thread is nearly as fast as two, and it does not collapse when another
    process holds a core (oversubscribed OpenMP threads slowed training ~10x). The numerics
    configuration (refimpl.numerics.apply, run by the root conftest) sets one thread too; this
    restores it after a test that changes it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
