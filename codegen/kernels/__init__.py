"""dsv4c's Triton kernels, one family a file (kernel, host wrapper, launch heuristics per target).

Importing this package imports nothing heavy: each kernel module imports Triton itself, so import it only
where a kernel is about to run (`from dsv4c.codegen.kernels import mhc` inside the function that calls it),
and the rest of dsv4c, CPU-only paths and tests included, never imports Triton.

- `mhc`: fused mHC layer boundaries (hc_pre, hc_post, hc_post_pre, hc_head, hc_post_head), the host wrappers;
  their kernels in `mhc_kernels` (the source an artifact stores), their launch choice in `mhc_launch` (pure
  Python); PyTorch twin in codegen/mhc_reference.py.
"""
