"""Test-session settings shared by every test module."""

import sys
from pathlib import Path

import torch

# Test helpers (hf_reference) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# The tests run tiny models whose steps are hundreds of small ops: OpenMP barriers dominate them, and on a
# 2-core machine one thread is many times faster than two.
torch.set_num_threads(1)
