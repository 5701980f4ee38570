"""The `dsv4c` command line: init-checkpoint, info, score.

Every subcommand is a small function taking parsed arguments and returning an exit code. Errors a user
can cause (bad config, bad checkpoint, bad token file) reach them as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console

from .checkpoint import Checkpoint, CheckpointError, summary, write_synthetic
from .config import ConfigError, ModelConfig
from .model import dequantize_weights
from .numerics import Numerics
from .presets import PRESETS, preset
from .scoring import score

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _init_checkpoint(args: argparse.Namespace, console: Console) -> int:
    cfg = preset(args.preset) if args.preset else ModelConfig.from_json(args.config)
    with console.status(f"writing {cfg.layer_pattern()} checkpoint to {args.out}"):
        out = write_synthetic(cfg, args.out, seed=args.seed, overwrite=args.overwrite)
    console.print(f"wrote {out} ({len(list(out.glob('*.safetensors')))} shards)")
    return 0


def _info(args: argparse.Namespace, console: Console) -> int:
    ckpt = Checkpoint.open(args.checkpoint)
    cfg = ckpt.config
    console.print("\n".join(summary(ckpt).lines()), highlight=False, soft_wrap=True)
    console.print(
        f"model       D={cfg.hidden_size} layers={cfg.num_hidden_layers}+{cfg.num_nextn_predict_layers} MTP "
        f"heads={cfg.num_attention_heads}x{cfg.head_dim} experts={cfg.n_routed_experts} top-{cfg.num_experts_per_tok} "
        f"(hash layers: {cfg.num_hash_layers}) vocab={cfg.vocab_size} experts in {cfg.expert_dtype}",
        highlight=False, soft_wrap=True)
    return 0


def read_token_ids(path: str) -> torch.Tensor:
    """Whitespace-separated integer token ids from a file ('-' for stdin)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError as err:
        raise ValueError(f"{path}: token ids must be whitespace-separated integers ({err})") from None
    if not ids:
        raise ValueError(f"{path}: no token ids")
    return torch.tensor(ids, dtype=torch.long)


def _score(args: argparse.Namespace, console: Console) -> int:
    tokens = read_token_ids(args.token_ids)
    ckpt = Checkpoint.open(args.checkpoint)
    cfg = ckpt.config
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"{args.token_ids}: token ids must lie in [0, {cfg.vocab_size})")
    num = Numerics(dtype=_DTYPES[args.dtype]) if args.numerics == "faithful" else Numerics.plain(_DTYPES[args.dtype])
    with console.status("loading weights"):
        weights = dequantize_weights({name: ckpt.get(name) for name in ckpt.headers}, num)
        weights = {k: v.to(args.device) for k, v in weights.items()}
    with console.status(f"scoring {tokens.numel()} tokens"):
        result = score(weights, cfg, num, tokens, chunk=args.chunk, decode_from=args.decode_from)
    console.print(f"tokens {tokens.numel()}  predicted {result.predicted}  mean NLL {result.mean_nll:.6f}  "
                  f"perplexity {result.perplexity:.4f}", highlight=False, soft_wrap=True)
    if args.logits_out:
        _save_logits(result.logits, tokens, args.logits_out)
        console.print(f"logits of every position written to {args.logits_out}")
    return 0


def _save_logits(logits: torch.Tensor, tokens: torch.Tensor, path: str) -> None:
    """Write {logits [T, V] fp32, token_ids [T]} atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file({"logits": logits.contiguous(), "token_ids": tokens.contiguous()}, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4c", description="A compiler for the decode step of DeepSeek-V4 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init-checkpoint", help="write a synthetic checkpoint in the released layout",
                          description="Write seeded random weights in DeepSeek-V4's released checkpoint layout "
                                      "(FP8 e4m3 with e8m0 block scales, MXFP4 experts, sharded safetensors).")
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    source.add_argument("--config", metavar="FILE.json", help="a config.json (released or transformers naming)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT")
    init.add_argument("out", metavar="OUT", help="directory to create")
    init.set_defaults(run=_init_checkpoint)

    info = sub.add_parser("info", help="summarise a checkpoint (reads headers only)",
                          description="Config summary, parameter and byte counts by dtype, the layer pattern "
                                      "(W window, C compressed sparse, H heavily compressed; lower case: hash-routed).")
    info.add_argument("checkpoint", metavar="CKPT")
    info.set_defaults(run=_info)

    sc = sub.add_parser("score", help="mean NLL and perplexity of a token sequence",
                        description="Run the reference model over a token sequence: prefill in chunks, then token "
                                    "by token from --decode-from; print mean NLL and perplexity.")
    sc.add_argument("checkpoint", metavar="CKPT")
    sc.add_argument("--token-ids", required=True, metavar="FILE", help="whitespace-separated token ids ('-': stdin)")
    sc.add_argument("--logits-out", metavar="FILE.safetensors", help="save every position's logits")
    sc.add_argument("--decode-from", type=int, metavar="N", help="prefill N tokens, then decode one at a time")
    sc.add_argument("--chunk", type=int, default=256, help="prefill chunk size (default 256)")
    sc.add_argument("--numerics", choices=("faithful", "plain"), default="faithful",
                    help="faithful: DeepSeek's FP8 activation quantisation; plain: none (default faithful)")
    sc.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activation dtype (default bf16)")
    sc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sc.set_defaults(run=_score)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return args.run(args, console)
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dsv4c {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
