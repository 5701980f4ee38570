"""Test-session settings shared by every test module."""

import importlib.util
import sys
import zlib
from pathlib import Path

import pytest
import torch

# Test helpers (hf_reference) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

from child_pool import child_pool, start_interpreter  # noqa: E402  (a test helper: on the path just above)

# The tests run tiny models whose steps are hundreds of small ops: OpenMP barriers dominate them, and on a
# 2-core machine one thread is many times faster than two.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which names each test's group in its node id
def pytest_collection_modifyitems(items):
    """Under `--dist loadgroup` (pyproject.toml) a module's tests run on one worker, so its module fixtures are made
    once: each test joins its module's xdist group unless its module marks a group it shares with other modules
    (those that use one compiled artifact per process: tests/mtp_artifact.py, plain_artifact.py,
    faithful_artifact.py), which then run on one worker together and compile it once."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(autouse=True)
def seeded_generator(request):
    """Every test draws its random inputs from a seed of its own name: a result does not depend on which tests ran
    before it on its worker, so a failure in CI reproduces with the same test run alone."""
    nodeid = request.node.nodeid
    if nodeid.rfind("@") > nodeid.rfind("]"):  # less the xdist group that `--dist loadgroup` appends
        nodeid = nodeid[:nodeid.rfind("@")]
    torch.manual_seed(zlib.crc32(nodeid.encode()))


@pytest.fixture(scope="module")
def interpreter_pool():
    """A child process running Triton's CPU interpreter (tests/child_pool.py), one a test module; the tests that
    take it skip where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    with child_pool(start_interpreter) as pool:
        yield pool
