import os

import pytest
import torch

from colabx._backend import cuda_kernels_available
from colabx.models import disable_onednn_convolutions


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and cuda_kernels_available(torch.cuda.current_device()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and colabx built with CUDA kernels for it")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _onednn_mode_off_after():
    """``apply_to_reference()`` leaves the oneDNN convolution mode on for the thread: no test
    may hand it to the next one."""
    yield
    disable_onednn_convolutions()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ``COLABX_CACHE`` (phantom and preprocessed data) for the tests of one module."""
    path = tmp_path_factory.mktemp("colabx-cache")
    old = os.environ.get("COLABX_CACHE")
    os.environ["COLABX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("COLABX_CACHE", None)
    else:
        os.environ["COLABX_CACHE"] = old
