"""Test-session settings shared by every test module."""

import sys
import zlib
from pathlib import Path

import pytest
import torch

# Test helpers (hf_reference) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# The tests run tiny models whose steps are hundreds of small ops: OpenMP barriers dominate them, and on a
# 2-core machine one thread is many times faster than two.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded_generator(request):
    """Every test draws its random inputs from a seed of its own name: a result does not depend on which tests ran
    before it on its worker, so a failure in CI reproduces with the same test run alone."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
