"""A one-worker spawned process pool: Triton decides at import whether it interprets kernels, so tests that
run Triton do it in a child whose initializer sets TRITON_INTERPRET before the import."""

import concurrent.futures
import contextlib
import multiprocessing


@contextlib.contextmanager
def child_pool(initializer):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=initializer) as pool:
        yield pool
