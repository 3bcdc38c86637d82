import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. The models in these tests are small, so one thread is as
    fast as two, and on a busy 2-core machine two OpenMP threads can wait on each other for
    seconds per call. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
