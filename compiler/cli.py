"""The `dsv4c` command line: demo, init-checkpoint, info, score, compile, generate, inspect.

Every subcommand is a small function taking parsed arguments and returning an exit code. Errors a user
can cause (bad config, bad checkpoint, bad token file) reach them as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dsv4c.model.checkpoint import Checkpoint, CheckpointError, summary, write_synthetic
from dsv4c.model.config import ConfigError, ModelConfig
from dsv4c.model.step import dequantize_weights
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import PRESETS, preset
from dsv4c.compiler.scoring import runner_logits, score, score_logits

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


def _is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _score_artifact(args: argparse.Namespace, tokens: torch.Tensor, console: Console):
    from dsv4c.runtime.loader import load

    engine = load(args.checkpoint, args.device)
    vocab = engine.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise ValueError(f"{args.token_ids}: token ids must lie in [0, {vocab})")
    if tokens.numel() > engine.max_seq_len:
        raise ValueError(f"{args.token_ids}: {tokens.numel()} tokens; the artifact holds {engine.max_seq_len}")
    with console.status(f"scoring {tokens.numel()} tokens"):
        logits = runner_logits(engine.runner, engine.new_state(1), tokens, engine.prefill_chunk, args.decode_from)
    return score_logits(logits, tokens)


def _score(args: argparse.Namespace, console: Console) -> int:
    tokens = read_token_ids(args.token_ids)
    result = _score_artifact(args, tokens, console) if _is_artifact(args.checkpoint) else _score_checkpoint(
        args, tokens, console)
    console.print(f"tokens {tokens.numel()}  predicted {result.predicted}  mean NLL {result.mean_nll:.6f}  "
                  f"perplexity {result.perplexity:.4f}", highlight=False, soft_wrap=True)
    if args.logits_out:
        _save_logits(result.logits, tokens, args.logits_out)
        console.print(f"logits of every position written to {args.logits_out}")
    return 0


def _score_checkpoint(args: argparse.Namespace, tokens: torch.Tensor, console: Console):
    ckpt = Checkpoint.open(args.checkpoint)
    cfg = ckpt.config
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"{args.token_ids}: token ids must lie in [0, {cfg.vocab_size})")
    num = _numerics(args)
    with console.status("loading weights"):
        weights = dequantize_weights({name: ckpt.get(name) for name in ckpt.headers}, num)
        weights = {k: v.to(args.device) for k, v in weights.items()}
    with console.status(f"scoring {tokens.numel()} tokens"):
        return score(weights, cfg, num, tokens, chunk=args.chunk, decode_from=args.decode_from)


def _numerics(args: argparse.Namespace) -> Numerics:
    dtype = _DTYPES[args.dtype]
    return Numerics(dtype=dtype) if args.numerics == "faithful" else Numerics.plain(dtype)


def _compile(args: argparse.Namespace, console: Console) -> int:
    from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint

    options = CompileOptions(targets=tuple(t.strip() for t in args.target.split(",") if t.strip()),
                             numerics=_numerics(args), max_seq_len=args.max_seq_len,
                             prefill_chunk=args.prefill_chunk, mtp=not args.no_mtp, debug=args.debug)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("compiling")
        out = compile_checkpoint(args.checkpoint, args.output, options, overwrite=args.overwrite,
                                 progress=lambda message: bar.update(task, description=message))
    console.print(f"wrote {out}")
    if args.explain:
        from dsv4c.runtime.artifact import load_artifact

        console.print("\n".join(explain_lines(load_artifact(out).manifest["pass_log"])), highlight=False,
                      soft_wrap=True)
    return 0


def explain_lines(pass_log: list[dict]) -> list[str]:
    """The pass log, one line a pass: what it matched and changed, per compiled variant."""
    lines = []
    for entry in pass_log:
        lines.append(f"{entry['variant']}: captured {entry['nodes_captured']} nodes in {entry['capture_s']:.1f} s")
        for record in entry["passes"]:
            lines.append(f"  {record['name']:<24} matched {record['matches']:>6}  "
                         f"nodes {record['nodes_before']:>6} -> {record['nodes_after']:<6} {record['description']}")
    return lines


def read_prompt(text: str) -> list[int]:
    """Prompt ids from a whitespace- or comma-separated string, or @FILE."""
    source = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        return [int(tok) for tok in source.replace(",", " ").split()]
    except ValueError as err:
        raise ValueError(f"--prompt-ids: expected integers ({err})") from None


def _generate(args: argparse.Namespace, console: Console) -> int:
    from dsv4c.runtime.loader import load
    from dsv4c.runtime.sampler import SamplingParams

    prompts = [read_prompt(p) for p in args.prompt_ids]
    engine = load(args.artifact, args.device)
    for prompt in prompts:
        if not prompt or max(prompt) >= engine.vocab_size or min(prompt) < 0:
            raise ValueError(f"--prompt-ids: ids must be non-empty and lie in [0, {engine.vocab_size})")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    result = engine.generate(prompts, args.max_new_tokens, sampling, mtp=args.mtp, seed=args.seed)
    report = {"tokens": result.tokens, "steps": result.steps, "drafted": result.drafted,
              "accepted": result.accepted, "rejected_nonfinite": result.rejected_nonfinite,
              "acceptance_rate": None if not result.drafted else result.acceptance_rate}
    if args.json:
        print(json.dumps(report))
        return 0
    for prompt, tokens in zip(prompts, result.tokens):
        console.print(f"{' '.join(map(str, prompt))} -> {' '.join(map(str, tokens))}", highlight=False, soft_wrap=True)
    if args.mtp:
        console.print(f"MTP: {result.accepted}/{result.drafted} drafts accepted "
                      f"({report['acceptance_rate'] or 0:.1%}), {result.rejected_nonfinite} non-finite", highlight=False)
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


def _demo(args: argparse.Namespace, console: Console) -> int:
    """The embedded tiny model end to end: write its checkpoint, compile it, load it, generate with MTP."""
    import tempfile

    from dsv4c.runtime.loader import load
    from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dsv4c-demo-"))
    cfg = preset("tiny")
    ckpt = write_synthetic(cfg, root / "tiny-checkpoint", seed=args.seed, overwrite=True)
    console.print(f"checkpoint  {ckpt}  ({cfg.layer_pattern()}, released layout: FP8 + MXFP4 + e8m0 scales)",
                  highlight=False, soft_wrap=True)
    options = CompileOptions(numerics=Numerics.plain(torch.float32), max_seq_len=256, prefill_chunk=2)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("compiling")
        art = compile_checkpoint(ckpt, root / "tiny.dsv4c", options, overwrite=True,
                                 progress=lambda message: bar.update(task, description=message))
    console.print(f"artifact    {art}")
    engine = load(art)
    prompts = [[0, 17, 42, 256, 7, 99], [0, 512, 3, 3, 800]]
    plain = engine.generate(prompts, args.max_new_tokens)
    spec = engine.generate(prompts, args.max_new_tokens, mtp=1)
    for prompt, tokens in zip(prompts, spec.tokens):
        console.print(f"prompt {prompt} -> {tokens}", highlight=False, soft_wrap=True)
    console.print(f"MTP (1 draft): identical to plain greedy decoding: {spec.tokens == plain.tokens}; "
                  f"{spec.accepted}/{spec.drafted} drafts accepted (random weights: the MTP head rarely agrees); "
                  f"{spec.steps} verify steps for {args.max_new_tokens} tokens", highlight=False, soft_wrap=True)
    return 0 if spec.tokens == plain.tokens else 1


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from dsv4c.runtime.artifact import load_artifact
    from dsv4c.export.inspect_artifact import describe, export_onnx

    artifact = load_artifact(args.artifact)
    console.print("\n".join(describe(artifact)), highlight=False, soft_wrap=True)
    if args.onnx:
        variant = args.variant or ("main_t1" if "main_t1" in artifact.plans else sorted(artifact.plans)[0])
        export_onnx(artifact, variant, args.onnx)
        console.print(f"{variant} exported to {args.onnx} (fused ops in the 'dsv4c' domain; onnx.checker full check passed)",
                      highlight=False, soft_wrap=True)
    return 0


def _add_numerics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numerics", choices=("faithful", "plain"), default="faithful",
                        help="faithful: DeepSeek's FP8 activation quantisation; plain: none (default faithful)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activation dtype (default bf16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4c", description="A compiler for the decode step of DeepSeek-V4 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded tiny model: compile, load, generate with MTP, report",
                          description="Write the tiny preset's checkpoint, compile it for the CPU, load the artifact "
                                      "and generate with and without MTP speculative decoding.")
    demo.add_argument("--workdir", help="where to write the checkpoint and artifact (default: a new temp dir)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

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
    sc.add_argument("checkpoint", metavar="CKPT|ART", help="a checkpoint directory or a compiled artifact")
    sc.add_argument("--token-ids", required=True, metavar="FILE", help="whitespace-separated token ids ('-': stdin)")
    sc.add_argument("--logits-out", metavar="FILE.safetensors", help="save every position's logits")
    sc.add_argument("--decode-from", type=int, metavar="N", help="prefill N tokens, then decode one at a time")
    sc.add_argument("--chunk", type=int, default=256, help="prefill chunk size (default 256)")
    _add_numerics_arguments(sc)
    sc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sc.set_defaults(run=_score)

    comp = sub.add_parser("compile", help="compile a checkpoint into an artifact",
                          description="Capture the decode step (and its MTP and prefill variants), run the target's "
                                      "passes, and write an artifact folder (plans, weights, manifest) atomically.")
    comp.add_argument("checkpoint", metavar="CKPT")
    comp.add_argument("-o", "--output", required=True, metavar="ART", help="artifact folder to create")
    comp.add_argument("--target", default="cpu", help="comma-separated targets: cpu, h100, h200, b200, gb300 "
                                                      "(default cpu)")
    comp.add_argument("--explain", action="store_true", help="print the pass log: what each pass matched and changed")
    _add_numerics_arguments(comp)
    comp.add_argument("--max-seq-len", type=int, default=4096, help="cache capacity per sequence (default 4096)")
    comp.add_argument("--prefill-chunk", type=int, default=32, help="tokens per prefill step (default 32)")
    comp.add_argument("--no-mtp", action="store_true", help="leave out the MTP variants")
    comp.add_argument("--debug", action="store_true", help="check every pass on random inputs (slow)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    comp.set_defaults(run=_compile)

    gen = sub.add_parser("generate", help="generate tokens with a compiled artifact",
                         description="Batched generation: greedy (default) or temperature/top-p sampling, with "
                                     "optional MTP speculative decoding (one draft token).")
    gen.add_argument("artifact", metavar="ART")
    gen.add_argument("--prompt-ids", required=True, action="append", metavar="IDS",
                     help="token ids ('1 2 3', '1,2,3' or @FILE); repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--mtp", type=int, choices=(0, 1), default=0, help="draft tokens per step (0 or 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--json", action="store_true", help="print tokens and acceptance counts as JSON")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(run=_generate)

    ins = sub.add_parser("inspect", help="passes applied, ops per variant, memory plan, kernels; ONNX export",
                         description="Describe a compiled artifact (it is verified first) and optionally export one "
                                     "step variant's optimised graph to ONNX, fused ops in a 'dsv4c' custom domain.")
    ins.add_argument("artifact", metavar="ART")
    ins.add_argument("--onnx", metavar="FILE", help="write the variant's graph as ONNX (checked with onnx.checker)")
    ins.add_argument("--variant", help="which step variant to export (default main_t1)")
    ins.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return args.run(args, console)
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, KeyError) as err:
        # ArtifactError, PlanError and SamplingParams errors are ValueErrors too
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dsv4c {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
