import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are a few microseconds each: on a shared 2-core machine, two OpenMP threads make
    each one wait on the other (milliseconds per op). One thread keeps these tests fast and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
