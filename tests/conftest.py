import pytest
import torch

from colabx._backend import cuda_kernels_available


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and cuda_kernels_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and colabx built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
