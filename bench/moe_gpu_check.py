"""GPU check of the fused MoE's routing and of its batch invariance, run on the GPU machine:
`python3 bench/moe_gpu_check.py`.

At DeepSeek-V4-Flash's sizes (bench/moe_bench.py's random layer: D = 4096, I = 2048, 256 MXFP4 experts, top 6,
the bf16 router, the FP8 shared expert), bf16 activations, faithful numerics (W4A8, the shared expert's inputs
rounded to FP8), score-routed (bias-shifted top-k) and hash-routed (a random table):
1. batch invariance: 64 tokens through `dsv4c::moe_fp4`'s kernels in one step and in steps of 1, 3, 12 and 48
   tokens (decode and MTP verification steps): bit-equal rows, so greedy MTP can equal greedy decoding;
2. the routing kernels against the model's torch routing (codegen/moe_routing.py) at T = 1, 64, 256: the same
   experts in the same order on every token whose k-th and (k+1)-th biased scores are 1e-3 apart or more,
   weights within 1e-5 (relative norm error: fp32 sums in another order, exp / log a few ulps off);
3. the whole op against its reference (codegen/moe_fp4.py) on those tokens: relative norm error <= 1e-2 (bf16
   outputs of exact products; FP8 MMA in-group sums).
Prints CHECK OK / CHECK FAILED lines and exits 1 if a check failed.
"""

from __future__ import annotations

import sys

import torch

from dsv4c.codegen import moe_routing
from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen.kernels import moe_fp4 as kernels
from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
from dsv4c.codegen.kernels.moe_route import route
from dsv4c.codegen.moe_fp4 import reference
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import layers
from moe_bench import D, E, I, K, LIMIT, ROUTING, rel_err, router_weights, routed_weights, shared_weights

STEPS, MARGIN, VOCAB = (1, 3, 12, 48), 1e-3, 1024


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"CHECK {'OK' if ok else 'FAILED'}: {name} {detail}", flush=True)
    return ok


def clear_rows(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The rows whose k-th and (k+1)-th biased scores are MARGIN apart (every row, hash-routed)."""
    if bias is None:
        return torch.ones(len(x), dtype=torch.bool, device=x.device)
    top = (layers.router_scores(x, router, ROUTING.scoring) + bias).topk(K + 1, dim=-1).values
    return top[:, K - 1] - top[:, K] >= MARGIN


def main() -> int:
    if not torch.cuda.is_available():
        return int(not check("a CUDA GPU", False, f"(this torch, {torch.__version__}, sees none)"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    lists, shared = routed_weights(gen), shared_weights(gen)
    router, bias = router_weights(gen)
    table = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:K] for _ in range(VOCAB)]).to(torch.int32)
    launch = moe_fp4_launch(target_for_device("cuda"), E, K, D, I, "w4a8", True)
    print(torch.cuda.get_device_name(), launch, flush=True)
    ok = True
    for kind in ("score", "hash"):
        def routing(x):
            """(x, router, bias, table, token ids) of x's rows for this kind."""
            if kind == "score":
                return x, router, bias, None, None
            return x, router, None, table, torch.randint(0, VOCAB, (len(x),), device="cuda", generator=gen)

        def op(operands):
            return kernels.moe_fp4(*operands, ROUTING, lists, shared, LIMIT, LIMIT, "w4a8", True)

        x, *rest = routing(torch.randn(sum(STEPS), D, device="cuda", generator=gen).to(torch.bfloat16))
        whole, edges = op((x, *rest)), torch.tensor((0, *STEPS)).cumsum(0).tolist()
        stepped = torch.cat([op((x[a:b], *rest[:3], None if rest[3] is None else rest[3][a:b]))
                             for a, b in zip(edges, edges[1:])])
        ok &= check(f"{kind}: a token's row does not depend on the step size",
                    torch.equal(whole, stepped) and not whole.isnan().any(),
                    f"({sum(STEPS)} tokens whole vs steps {STEPS})")
        for n in (1, 64, 256):
            x = torch.randn(4 * n, D, device="cuda", generator=gen).to(torch.bfloat16)
            operands = routing(x[clear_rows(x, router, bias if kind == "score" else None)][:n].contiguous())
            want_ids, want_weights = moe_routing.route(*operands, ROUTING)
            ids, weights = route(*operands, ROUTING, launch)
            err = rel_err(weights, want_weights)
            ok &= check(f"{kind} T={len(operands[0])}: the routing kernels select torch's experts",
                        torch.equal(ids.long(), want_ids) and err <= 1e-5, f"(weights rel err {err:.1e})")
            want = reference(*operands, *lists, shared, ROUTING.top_k, ROUTING.scoring, ROUTING.normalize,
                             ROUTING.scale, LIMIT, LIMIT, "w4a8", True)
            err = rel_err(op(operands), want)
            ok &= check(f"{kind} T={len(operands[0])}: moe_fp4 equals its reference", err <= 1e-2,
                        f"(rel err {err:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
