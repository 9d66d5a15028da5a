import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module with one torch thread, restored afterwards. For modules of tiny tensors: on a
    shared 2-core machine the intra-op thread pool only adds contention (Euler-Maruyama steps became
    up to 50x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
