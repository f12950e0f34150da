import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # Test tensors are tiny: OpenMP thread hand-offs cost far more than the maths on a 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
