"""A one-worker spawned process pool: Triton decides at import whether it interprets kernels, so tests that
run Triton do it in a child whose initializer sets TRITON_INTERPRET before the import."""

import concurrent.futures
import contextlib
import multiprocessing
import os

import torch


def start_interpreter():
    """A spawned child's initializer: Triton's interpreter (TRITON_INTERPRET set before Triton is imported in
    this fresh process), one torch thread."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


@contextlib.contextmanager
def child_pool(initializer):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=initializer) as pool:
        yield pool


def run_in(pool, fn=None):
    """A function running `fn(*args)` in the pool's child and returning its result; without `fn`, one that takes
    the function to run first (`run(fn, *args)`). The kernel tests' `interpreter_pool` (tests/conftest.py) is the
    pool they pass."""
    if fn is None:
        return lambda fn, *args: pool.submit(fn, *args).result()
    return lambda *args: pool.submit(fn, *args).result()
