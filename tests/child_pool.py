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
