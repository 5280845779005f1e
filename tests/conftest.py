import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
# compiled kernels of the test run go to a private cache, not the user's
os.environ.setdefault("RECURKIT_CACHE_DIR", tempfile.mkdtemp(prefix="recurkit-test-cache-"))
