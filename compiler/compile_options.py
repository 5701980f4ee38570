"""What a compile makes (compiler/pipeline.py): its targets, numerics, cache capacity, step variants and jobs.
A plain frozen dataclass that crosses to the variant workers as JSON (compiler/variant_compile.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dsv4c.compiler.capture import StepVariant
from dsv4c.model.config import MAX_DRAFTS
from dsv4c.model.numerics import Numerics

DEFAULT_MAX_SEQ_LEN = 4096


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to compile: targets, numerics, cache capacity, prefill chunk, whether to include MTP."""

    targets: tuple[str, ...] = ("cpu",)
    numerics: Numerics = Numerics.faithful()
    max_seq_len: int | None = None  # None: the model's max_position_embeddings, at most DEFAULT_MAX_SEQ_LEN
    prefill_chunk: int = 32
    mtp: bool = True
    max_drafts: int = MAX_DRAFTS  # with MTP: the most drafts a step verifies (1 .. MAX_DRAFTS)
    debug: bool = False
    moe: str | None = None  # --moe w4a8 | w4a4 | w4a16 | unfused (None: per target, codegen/targets.py)
    kernel_batches: tuple[int, ...] = (1,)  # batch sizes the GPU targets' mHC kernels are built for (codegen/aot.py)
    jobs: int = 1  # processes compiling the variants (compiler/variant_compile.py)

    def __post_init__(self):
        if self.jobs < 1:
            raise ValueError(f"jobs: got {self.jobs}; allowed: 1 or more")
        if self.mtp and not 1 <= self.max_drafts <= MAX_DRAFTS:
            raise ValueError(f"max_drafts: got {self.max_drafts}; allowed: 1 to {MAX_DRAFTS}")

    @property
    def drafts(self) -> int:
        """The draft count the manifest records: `max_drafts` with MTP, 0 without."""
        return self.max_drafts if self.mtp else 0

    def variants(self) -> list[StepVariant]:
        sizes = sorted({1, 2, self.prefill_chunk, *range(1, self.drafts + 2)})
        kinds = ("main", "mtp") if self.mtp else ("main",)
        return [StepVariant(kind, t) for kind in kinds for t in sizes]

    def to_json(self) -> dict[str, Any]:
        """The options as JSON values (the numerics' dtype by name)."""
        raw = dataclasses.asdict(self)
        raw["numerics"] = {**raw["numerics"], "dtype": str(self.numerics.dtype).removeprefix("torch.")}
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "CompileOptions":
        """The inverse of `to_json`."""
        numerics = Numerics(**{**raw["numerics"], "dtype": getattr(torch, raw["numerics"]["dtype"])})
        tuples = {k: tuple(raw[k]) for k in ("targets", "kernel_batches")}
        return cls(**{**raw, **tuples, "numerics": numerics})
