"""The runtime: artifact loading and verification, plans and their executor, the state pool, sampler and engine.

`dsv4c.runtime.load(path, device)` returns an `Engine` over a compiled artifact;
`load_tokenizer(path)` its tokenizer, if it carries one. The runtime imports the
fused-op definitions (codegen) and the model's formats, never the compiler driver or the passes.
"""

from .loader import load, load_tokenizer

__all__ = ["load", "load_tokenizer"]
