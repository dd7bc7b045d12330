import os
import sys

import pytest

# Triton picks its interpreter when kernels are defined, i.e. when kernels/*.py is first imported
# (model.py imports it): on a machine without CUDA the kernel tests run under the interpreter, so set
# it before any test module imports anything. CPU model code still uses SDPA (kernels/attention.py
# runs the kernel on CPU only when PRISM_ATTENTION=triton asks for it).
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
