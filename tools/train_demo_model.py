"""Train the embedded demo model: a small DeepSeek-V4 on the Python standard library's own sources, byte by byte.

    python tools/train_demo_model.py                      # ~27 minutes on one CPU core; writes model/demo_model/
    python tools/train_demo_model.py --steps 20 --out /tmp/try --overwrite   # a quick look

The model (`demo_config`) is the `tiny` preset's shape with a byte-level vocabulary: every attention kind
(sliding window, C4 with the Lightning Indexer, C16), hash-routed and score-routed MoE, mHC, and the MTP layer.
Text: the `.py` files of this Python's standard library (`corpus_files`; generated codec tables and tests left
out), each file preceded by `<|bos|>`; a file is held out for evaluation when the sha256 of its relative path
says so (`is_held_out`), the same files on any installation. Tokens are bytes (model/tokenizer.py).

Training runs the reference model's own step (`model/step.forward` over a whole sequence from an empty state,
then `mtp_forward`) in plain fp32 numerics, so the trained math is exactly the math the compiler captures:
- loss = cross-entropy of the next byte + 0.3 x cross-entropy of the MTP layer's byte after next, the MTP
  layer fed the main model's final streams h_t and the true token t+1, as DeepSeek-V3/V4 train it;
- score-routed layers balance their experts DeepSeek's auxiliary-loss-free way: the router bias, which only
  selects, moves each step by `--bias-rate` towards equal load; hash layers keep their token table;
- the Lightning Indexer's projections get no gradient through its top-k (DeepSeek trains them with a separate
  distillation loss, not done here): they keep their seeded initial values and still choose which C4 entries
  each query reads;
- for the last `--qat-fraction` of the steps every weight runs through its stored format (FP8 e4m3 with
  128x128 e8m0 scales, MXFP4 experts, bf16) with a straight-through gradient, so the released-format
  checkpoint keeps what training learnt.
The checkpoint is written in the released format with `tokenizer.json` beside it, then read back and
evaluated through the reference model (plain fp32) on every held-out byte (each file in pieces of 4 KiB):
perplexity per byte, the unigram model's on the same bytes, and the MTP layer's greedy acceptance (how often its
draft of token t+2 equals the main model's greedy token t+2); `training.json` records these, the held-out files
and the training settings. `--evaluate-only` measures a written checkpoint again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv4c.model.checkpoint import Checkpoint, write_checkpoint
from dsv4c.model.config import ModelConfig
from dsv4c.model.layers import routed_experts
from dsv4c.model.layout import tensor_specs
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.quant import dequant_fp4_weight, dequant_fp8_weight, quantize_fp4_weight, quantize_fp8_weight
from dsv4c.model.step import Weights, dequantize_weights, forward, init_state, mtp_forward
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.model.tokenizer import BYTE_BOS_ID, BYTE_EOS_ID, TOKENIZER_NAME, byte_tokenizer, tokenizer_json

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "demo_model"
MTP_LOSS_WEIGHT = 0.3  # DeepSeek-V3's lambda for the first 10T tokens
VOCAB = 320  # 256 bytes + <|bos|> + <|eos|>, padded to a multiple of 64
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
NUM = Numerics.plain(torch.float32)


def demo_config() -> ModelConfig:
    """The demo model: `tiny`'s layers (W, C4, C16 | W MTP; the first layer hash-routed) over bytes, with a
    64-byte window."""
    return tiny().replace(vocab_size=VOCAB, sliding_window=64, bos_token_id=BYTE_BOS_ID, eos_token_id=BYTE_EOS_ID)


# ---- text ------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """The standard library's .py files (paths relative to `root`, sorted), without tests, codec tables
    and installed packages."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not set(rel.parts[:-1]) & _SKIPPED_DIRS:
            files.append(rel.as_posix())
    return sorted(files)


def is_held_out(rel: str) -> bool:
    """One file in about 16 is held out, chosen by the sha256 of its relative path."""
    return hashlib.sha256(rel.encode()).digest()[0] % 16 == 0


def token_stream(root: Path, files: list[str]) -> torch.Tensor:
    """`<|bos|>` then the file's bytes, for each file in order, as one int64 tensor of token ids."""
    pieces = []
    for rel in files:
        pieces.append(torch.tensor([BYTE_BOS_ID]))
        pieces.append(byte_ids((root / rel).read_bytes()))
    return torch.cat(pieces)


def byte_ids(data: bytes) -> torch.Tensor:
    """The token ids of raw bytes (the byte tokenizer's ids are the byte values), int64."""
    return torch.tensor(list(data), dtype=torch.long) if not data else torch.frombuffer(
        bytearray(data), dtype=torch.uint8).long()


def batches(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    """Endless random windows of `length + 2` tokens: inputs, next tokens, and the tokens after next."""
    while True:
        starts = torch.randint(0, stream.numel() - length - 2, (batch,), generator=generator)
        yield torch.stack([stream[s: s + length + 2] for s in starts.tolist()])


# ---- stored formats ------------------------------------------------------------------------------
def stored_form(cfg: ModelConfig, weights: Weights) -> dict[str, torch.Tensor]:
    """Model weights (fp32 values, int64 token table) -> the released layout's tensors: FP8 and MXFP4 weights
    with their e8m0 scales, bf16, fp32 and int32 as `tensor_specs` says."""
    out = {}
    for name, spec in tensor_specs(cfg).items():
        if spec.format == "e8m0":
            continue
        value = weights[name].detach()
        if spec.format == "fp8":
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp8_weight(value)
        elif spec.format == "fp4":
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp4_weight(value)
        else:
            out[name] = value.to(spec.dtype)
    return out


def through_stored_format(cfg: ModelConfig, weights: Weights) -> Weights:
    """Each float weight replaced by the value its stored format decodes to, with a straight-through gradient."""
    specs = tensor_specs(cfg)
    out = {}
    for name, value in weights.items():
        fmt = specs[name].format
        if fmt in ("int32", "fp32"):
            out[name] = value
            continue
        with torch.no_grad():
            if fmt == "fp8":
                decoded = dequant_fp8_weight(*quantize_fp8_weight(value))
            elif fmt == "fp4":
                decoded = dequant_fp4_weight(*quantize_fp4_weight(value))
            else:
                decoded = value.to(specs[name].dtype).float()
        out[name] = value + (decoded - value).detach()
    return out


# ---- the model's losses ----------------------------------------------------------------------------
class ExpertLoad:
    """A `RoutedExperts` that counts how many tokens each score-routed layer sends to each expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.counts: dict[str, torch.Tensor] = {}

    def __call__(self, x, ids, weights, w, prefix, cfg, num):
        if prefix + "gate.bias" in w:
            load = torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts).float()
            self.counts[prefix] = self.counts.get(prefix, 0) + load
        return routed_experts(x, ids, weights, w, prefix, cfg, num)


def model_logits(w: Weights, cfg: ModelConfig, window: torch.Tensor, routed=routed_experts):
    """(main logits `[B, L, V]`, MTP logits `[B, L, V]`) of a window `[B, L + 2]`: position t's main logits
    predict token t+1, its MTP logits (from h_t and token t+1) token t+2."""
    batch, length = window.shape[0], window.shape[1] - 2
    state = init_state(cfg, batch, length + max(cfg.compress_ratios), NUM)
    start = torch.zeros(batch, dtype=torch.long)
    logits, hidden, _ = forward(w, state, window[:, :length], start, cfg, NUM, routed)
    draft, _, _ = mtp_forward(w, state, window[:, 1:length + 1], hidden, start, cfg, NUM, routed)
    return logits, draft


def losses(w: Weights, cfg: ModelConfig, window: torch.Tensor,
           routed=routed_experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(main next-byte cross-entropy, MTP byte-after-next cross-entropy) in nats, averaged over the window."""
    length = window.shape[1] - 2
    logits, draft = model_logits(w, cfg, window, routed)
    main = F.cross_entropy(logits.flatten(0, 1), window[:, 1:length + 1].flatten())
    mtp = F.cross_entropy(draft.flatten(0, 1), window[:, 2:].flatten())
    return main, mtp


# ---- training ----------------------------------------------------------------------------------------
def initial_weights(cfg: ModelConfig, seed: int) -> Weights:
    """The seeded synthetic checkpoint's weights (model/synthetic.py), decoded to fp32 as trainable leaves."""
    weights = dequantize_weights(dict(synthetic_tensors(cfg, seed)), NUM)
    return {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in weights.items()}


def optimizer(weights: Weights, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases, sinks, mHC scales) do not; router biases are not trained
    by gradient (they only select: `balance` moves them)."""
    trained = {k: v for k, v in weights.items() if v.is_floating_point() and not k.endswith("gate.bias")}
    decay = [v for v in trained.values() if v.ndim >= 2]
    rest = [v for v in trained.values() if v.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def balance(weights: Weights, load: ExpertLoad, rate: float) -> None:
    """DeepSeek's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others'."""
    with torch.no_grad():
        for prefix, counts in load.counts.items():
            weights[prefix + "gate.bias"] += rate * torch.sign(counts.mean() - counts)
    load.counts.clear()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(cfg: ModelConfig, args: argparse.Namespace, train_stream: torch.Tensor, held_stream: torch.Tensor) -> Weights:
    """`args.steps` AdamW steps on random windows of the training stream; logs to stdout."""
    weights = initial_weights(cfg, args.seed)
    opt = optimizer(weights, args.lr, args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    data = batches(train_stream, args.batch, args.seq_len, generator)
    probe = next(batches(held_stream, 4, args.seq_len, torch.Generator().manual_seed(1)))
    load = ExpertLoad(cfg)
    qat_from = int(args.steps * (1 - args.qat_fraction))
    began = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        w = through_stored_format(cfg, weights) if step >= qat_from else weights
        main, mtp = losses(w, cfg, next(data), load)
        opt.zero_grad(set_to_none=True)
        (main + MTP_LOSS_WEIGHT * mtp).backward()
        torch.nn.utils.clip_grad_norm_([v for v in weights.values() if v.grad is not None], args.clip)
        opt.step()
        balance(weights, load, args.bias_rate)
        if step % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                held_main, held_mtp = losses(w, cfg, probe)
            elapsed = time.time() - began
            print(f"step {step:5d}/{args.steps}  train {main.item() / math.log(2):.3f} bits/byte  mtp "
                  f"{mtp.item() / math.log(2):.3f}  held-out {held_main.item() / math.log(2):.3f} / "
                  f"{held_mtp.item() / math.log(2):.3f}  {'qat  ' if step >= qat_from else ''}"
                  f"{elapsed:6.0f} s  eta {elapsed / (step + 1) * (args.steps - step - 1):5.0f} s", flush=True)
    return {k: v.detach() for k, v in weights.items()}


# ---- evaluation of the saved checkpoint ------------------------------------------------------------
EVAL_PIECE = 4096  # bytes of a held-out file scored in one step from an empty state


def held_out_pieces(root: Path, files: list[str]) -> list[torch.Tensor]:
    """Every held-out file as `<|bos|>` + its bytes, cut into pieces of EVAL_PIECE + 1 tokens that overlap by one,
    so that scoring each piece's tokens after its first predicts every byte exactly once."""
    pieces = []
    for rel in files:
        ids = torch.cat((torch.tensor([BYTE_BOS_ID]), byte_ids((root / rel).read_bytes())))
        pieces.extend(ids[i: i + EVAL_PIECE + 1] for i in range(0, ids.numel() - 1, EVAL_PIECE))
    return pieces


def unigram_bits(train_stream: torch.Tensor, pieces: list[torch.Tensor]) -> float:
    """Bits per byte of the held-out bytes under the training bytes' frequencies (add-one smoothed)."""
    counts = torch.bincount(train_stream[train_stream < 256], minlength=256).double() + 1
    logp = (counts / counts.sum()).log2()
    return float(-logp[torch.cat([piece[1:] for piece in pieces])].mean())


def evaluate(path: Path, pieces: list[torch.Tensor]) -> dict[str, float]:
    """Through the reference model on the checkpoint at `path` as stored: bits and perplexity per byte of the
    pieces' tokens after the first, and the MTP layer's greedy acceptance (its draft of token t+2 from h_t and
    token t+1 against the main model's greedy token t+2)."""
    with Checkpoint.open(path) as ckpt:
        cfg = ckpt.config
        w = dequantize_weights({name: ckpt.get(name) for name in ckpt.headers}, NUM)
    nll, predicted, agree, drafted = 0.0, 0, 0, 0
    start = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        for piece in pieces:
            n = piece.numel()
            state = init_state(cfg, 1, n + max(cfg.compress_ratios), NUM)
            logits, hidden, state = forward(w, state, piece[None, :-1], start, cfg, NUM)
            nll += F.cross_entropy(logits[0], piece[1:], reduction="sum").item()
            predicted += n - 1
            if n < 3:
                continue
            draft, _, _ = mtp_forward(w, state, piece[None, 1:-1], hidden[:, :-1], start, cfg, NUM)
            agree += int((draft[0].argmax(-1) == logits[0, 1:].argmax(-1)).sum())
            drafted += n - 2
    bits = nll / predicted / math.log(2)
    return {"bits_per_byte": bits, "perplexity_per_byte": 2 ** bits, "bytes": predicted,
            "mtp_greedy_acceptance": agree / drafted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="measure the checkpoint at --out again (no training) and update its training.json")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=8, help="windows a step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens a window")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    parser.add_argument("--bias-rate", type=float, default=2e-3, help="router bias step of the load balancing")
    parser.add_argument("--qat-fraction", type=float, default=0.3, help="final share of steps through stored formats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = demo_config()
    root = stdlib_root()
    files = corpus_files(root)
    train_files = [f for f in files if not is_held_out(f)]
    held_files = [f for f in files if is_held_out(f)]
    train_stream, held_stream = token_stream(root, train_files), token_stream(root, held_files)
    print(f"{cfg.layer_pattern()} model, {sum(s.params for s in tensor_specs(cfg).values()) / 1e6:.2f}M parameters; "
          f"{len(train_files)} training files ({train_stream.numel() / 1e6:.1f} MB), {len(held_files)} held out "
          f"({held_stream.numel() / 1e6:.2f} MB) from {root}", flush=True)
    if args.evaluate_only:
        out = args.out
        record = json.loads((out / "training.json").read_text())
    else:
        began = time.time()
        weights = train(cfg, args, train_stream, held_stream)
        record = {"train_seconds": round(time.time() - began), "settings": vars(args) | {"out": str(args.out)},
                  "corpus": {"python": platform.python_version(), "train_files": len(train_files),
                             "train_bytes": int(train_stream.numel()), "held_out_files": held_files},
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        out = write_checkpoint(cfg, args.out, stored_form(cfg, weights),
                               {TOKENIZER_NAME: tokenizer_json(byte_tokenizer())}, overwrite=args.overwrite)
    pieces = held_out_pieces(root, held_files)
    metrics = evaluate(out, pieces)
    metrics["unigram_bits_per_byte"] = unigram_bits(train_stream, pieces)
    metrics["unigram_perplexity_per_byte"] = 2 ** metrics["unigram_bits_per_byte"]
    (out / "training.json").write_text(json.dumps(record | {"metrics": metrics}, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 2**20:.2f} MiB, {record['train_seconds'] / 60:.1f} min of training")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
