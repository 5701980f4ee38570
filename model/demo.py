"""The embedded demo model: a small DeepSeek-V4 trained on the Python standard library's sources, byte by byte.

It ships inside the package (`model/demo_model/`: config.json, the released-format safetensors shards and index,
tokenizer.json, and training.json with how it was trained and what it scores); `tools/train_demo_model.py`
trains and writes it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().with_name("demo_model")
# Python-ish beginnings for the demo model, which learnt from the standard library's sources (`dsv4c demo`; the
# bench's MTP acceptance on an artifact that carries a tokenizer).
DEMO_PROMPTS = ("def parse(", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self",
                "    for i in range(")


def demo_checkpoint() -> Path:
    """The embedded model's checkpoint folder; FileNotFoundError when this installation lacks it."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"{DEMO_MODEL}: the embedded demo model is missing from this installation "
                                "(python tools/train_demo_model.py writes it)")
    return DEMO_MODEL
