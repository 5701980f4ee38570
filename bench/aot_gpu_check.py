"""GPU check of the ahead-of-time mHC kernels, run on the GPU machine: `python3 bench/aot_gpu_check.py`.

1. Compiles tiny cut to one layer (C4 with the indexer; hc_pre, hc_post_pre and hc_head boundaries) for h100
   with the local Triton, so the artifact's sm_90a binaries match it.
2. Loads it on cuda: the loader must launch the stored binaries (runtime/stored_kernels.py) and nothing may
   be compiled by Triton's JIT for the artifact's token counts; generates greedy tokens and compares them with
   the same artifact on cpu (reference implementations).
3. Loads it again as if the local Triton differed: the launches are compiled from source, same tokens.
Prints CHECK OK / CHECK FAILED lines; writes under /tmp/aotcheck.
"""
import shutil
import time
from pathlib import Path

import torch
import triton

from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.presets import tiny
from dsv4c.runtime import loader
from dsv4c.runtime.state_pool import StatePool
from dsv4c.runtime.step_runner import BucketRunner
from dsv4c.runtime import stored_kernels
from dsv4c.runtime.artifact import load_artifact

torch.set_num_threads(8)
ROOT = Path("/tmp/aotcheck")
PROMPTS = [[5, 7, 11, 13, 17], [3, 1, 4]]


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"CHECK {'OK' if ok else 'FAILED'}: {name} {detail}", flush=True)


def generate(art: Path, device: str, local_triton: str) -> tuple[list, stored_kernels.KernelPlan]:
    artifact = load_artifact(art)
    plan = stored_kernels.kernel_plan(artifact.manifest, art, loader.local_target(torch.device(device)),
                                      local_triton=local_triton)
    print(plan.message[:240], flush=True)
    runner = BucketRunner(loader.plan_executors(artifact, torch.device(device), plan),
                          StatePool(loader.state_specs(artifact), len(PROMPTS), device), cuda_graphs=False)
    engine = loader.Engine(runner, loader.state_specs(artifact), artifact.manifest["prefill_chunk"],
                           artifact.manifest["max_seq_len"], device,
                           vocab_size=artifact.manifest["config"]["vocab_size"], pool=runner.pool)
    start = time.time()
    tokens = engine.generate(PROMPTS, 8).tokens
    print(f"{device}: {tokens} in {time.time() - start:.2f} s", flush=True)
    return tokens, plan


def main() -> None:
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    start = time.time()
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0)
    write_synthetic(cfg, ROOT / "ckpt", seed=3)
    options = CompileOptions(targets=("h100",), numerics=Numerics.plain(torch.float32), max_seq_len=64,
                             prefill_chunk=2, mtp=False)
    compile_checkpoint(ROOT / "ckpt", ROOT / "art", options,
                       progress=lambda m: print(f"{time.time() - start:6.1f} s  {m}", flush=True))
    manifest = load_artifact(ROOT / "art").manifest
    print("kernels:", {sm: len(v) for sm, v in manifest["kernels"].items()}, flush=True)
    cpu, _ = generate(ROOT / "art", "cpu", triton.__version__)
    stored, plan = generate(ROOT / "art", "cuda", triton.__version__)
    launcher = plan.launcher
    check("stored binaries used", plan.mode == "stored" and launcher is not None and launcher.launched_stored > 0,
          f"mode={plan.mode} stored={getattr(launcher, 'launched_stored', 0)} jit={getattr(launcher, 'launched_jit', 0)}")
    check("nothing compiled by the JIT", launcher is not None and launcher.launched_jit == 0)
    check("cuda (stored) tokens == cpu tokens", stored == cpu)
    recompiled, plan = generate(ROOT / "art", "cuda", "0.0-other")
    check("other Triton: recompiled from source", plan.mode == "compile" and plan.launcher is None)
    check("cuda (recompiled) tokens == cpu tokens", recompiled == cpu)


if __name__ == "__main__":
    main()
