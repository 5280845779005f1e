import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# compiled kernels of the test run go to a private cache, not the user's
os.environ.setdefault("RECURKIT_CACHE_DIR", tempfile.mkdtemp(prefix="recurkit-test-cache-"))


@pytest.fixture
def two_threads():
    """The generated sources split work by torch's thread count: golden files hold 2."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
