"""How the reference model rounds: the activation dtype and the switches for each simulation.

DeepSeek's reference code is the definition of "faithful": bf16 activations, FP8 activation quantisation
before every FP8/FP4 weight matmul, the FP8 rounding of cached KV values and the Hadamard + FP4 rounding
of the indexer's queries and keys. transformers computes none of these roundings; a test that compares
against it turns each off by name.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Rounding choices of one run of the reference model.

    dtype: activation dtype (bf16 as released, fp32 to compare implementations).
    act_quant: quantise activations to FP8 e4m3 (blocks of 128) before FP8/FP4 weight matmuls.
    kv_fp8: round the no-RoPE dims of cached KV (window and compressed) to FP8 in blocks of 64.
    indexer_fp4: Hadamard-rotate the indexer's queries and keys and round them to FP4 in blocks of 32.
    shared_expert_clamp: clamp the shared expert's SwiGLU inputs to swiglu_limit, as routed experts do.
    """

    dtype: torch.dtype = torch.bfloat16
    act_quant: bool = True
    kv_fp8: bool = True
    indexer_fp4: bool = True
    shared_expert_clamp: bool = True

    @classmethod
    def faithful(cls) -> "Numerics":
        """DeepSeek's reference numerics: bf16 with every rounding simulation on."""
        return cls()

    @classmethod
    def plain(cls, dtype: torch.dtype = torch.float32) -> "Numerics":
        """The model's math with no rounding simulation at all: no activation quantisation, no FP8 rounding of
        cached KV, no Hadamard + FP4 rounding in the indexer (DeepSeek's code with every `act_quant`/`fp4_quant`
        removed; transformers' `deepseek_v4` computes this, less the shared-expert clamp)."""
        return cls(dtype=dtype, act_quant=False, kv_fp8=False, indexer_fp4=False)

    def roundings(self) -> tuple[str, ...]:
        """The names of the rounding simulations this run applies (empty for plain numerics)."""
        return tuple(name for name in ("act_quant", "kv_fp8", "indexer_fp4") if getattr(self, name))

    def replace(self, **changes: object) -> "Numerics":
        return dataclasses.replace(self, **changes)
