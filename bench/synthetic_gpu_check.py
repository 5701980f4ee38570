"""GPU check of the synthetic checkpoint writer, run on the GPU machine:
`python3 bench/synthetic_gpu_check.py [--flash-slice OUT]`.

1. Writes the tiny preset with device="cuda" and with device="cpu" and compares every file's sha256.
2. Generates real-size flash-slice tensors (an FP4 expert of each shape, FP8 projections, blocks of rows of
   the embedding and the head, a hash-routing table, an mHC matrix, norms) on cuda and on cpu and compares
   their bytes.
3. With --flash-slice OUT: writes flash-slice with device="cuda" to OUT (replacing a checkpoint there) and
   prints the GB written and the seconds taken.
Prints CHECK OK / CHECK FAILED lines and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv4c.model import layout, presets, synthetic
from dsv4c.model.checkpoint import write_synthetic

FLASH_TENSORS = (
    "layers.0.ffn.experts.0.w1.weight", "layers.3.ffn.experts.255.w2.weight", "layers.2.attn.wq_b.weight",
    "layers.0.attn.wo_a.weight", "mtp.0.e_proj.weight", "layers.0.ffn.gate.tid2eid", "layers.1.hc_ffn_fn",
    "layers.3.attn.compressor.ape", "layers.0.attn_norm.weight", "layers.2.ffn.gate.weight", "hc_head_scale",
)
FLASH_ROW_BLOCKS = (("embed.weight", 0, 4096), ("head.weight", 129280 - 4096, 129280))


def file_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"CHECK {'OK' if ok else 'FAILED'}: {name} {detail}", flush=True)
    return ok


def tiny_files_match(root: Path) -> bool:
    cuda = file_hashes(write_synthetic(presets.tiny(), root / "cuda", seed=0, device="cuda"))
    cpu = file_hashes(write_synthetic(presets.tiny(), root / "cpu", seed=0, device="cpu"))
    differ = sorted(name for name in cpu.keys() | cuda.keys() if cpu.get(name) != cuda.get(name))
    return check("tiny checkpoint: cuda files == cpu files", not differ and bool(cpu),
                 f"({len(cpu)} files{'; differ: ' + ', '.join(differ) if differ else ''})")


def flash_tensors_match() -> bool:
    cfg = presets.flash_slice()
    specs = layout.tensor_specs(cfg)
    blocks = [(name, 0, specs[name].shape[0]) for name in FLASH_TENSORS] + list(FLASH_ROW_BLOCKS)
    ok = True
    for name, start, stop in blocks:
        on = {device: synthetic.synthesize_rows(cfg, specs[name], 0, start, stop, device) for device in ("cuda", "cpu")}
        differ = [part for part in on["cpu"] if as_bytes(on["cpu"][part]) != as_bytes(on["cuda"][part])]
        ok &= check(f"flash-slice {name} rows [{start}, {stop}): cuda == cpu", not differ,
                    f"({', '.join(differ)} differ)" if differ else "")
    return ok


def time_flash_slice(out: Path) -> None:
    torch.cuda.synchronize()
    start = time.perf_counter()
    write_synthetic(presets.flash_slice(), out, seed=0, device="cuda", overwrite=out.exists())
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"flash-slice written with device=cuda to {out}: {size / 1e9:.2f} GB in {seconds:.1f} s "
          f"({size / 1e9 / seconds:.2f} GB/s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flash-slice", type=Path, metavar="OUT", help="also time writing flash-slice to OUT")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"CHECK FAILED: this torch ({torch.__version__}) sees no CUDA GPU", flush=True)
        return 1
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        ok = tiny_files_match(Path(tmp))
    ok &= flash_tensors_match()
    if args.flash_slice:
        time_flash_slice(args.flash_slice)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
