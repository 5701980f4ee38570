"""The `dsv4c` command line: demo, init-checkpoint, info, score, compile, generate, inspect.

Every subcommand is a small function taking parsed arguments and returning an exit code. Errors a user
can cause (a bad flag value, config, checkpoint, token file or output path) reach them as one line on
stderr naming the flag or file, exit code 2, and are found before any long work starts (flag values at
parse time: compiler/cli_args.py; the output path first thing in the compile). Ctrl-C is one line, exit
code 130, and leaves nothing at the output.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from dsv4c.compiler import cli_args
from dsv4c.compiler.cli_args import OneLineParser, read_token_ids
from dsv4c.compiler.input_errors import INPUT_ERRORS, one_line
from dsv4c.compiler.scoring import runner_logits, score, score_logits
from dsv4c.model.checkpoint import Checkpoint, summary, write_synthetic
from dsv4c.model.config import ModelConfig
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import PRESETS, preset
from dsv4c.model.config import MAX_DRAFTS
from dsv4c.model.step import dequantize_weights
from dsv4c.model.tokenizer import TOKENIZER_NAME, TextStream, decode, encode, folder_tokenizer

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
# The tiny model's steps are hundreds of small ops: OpenMP barriers cost more than a second thread gains.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def _progress(console: Console, description: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner with the elapsed time on a terminal; elsewhere (a log, a pipe) one line on stderr a
    message, stamped with the seconds since the start, so a run cut short shows how far it got (errors stay one line:
    nothing is printed before the first message). Yields a function
    that replaces its text."""
    if not console.is_terminal:
        start = time.monotonic()

        def say(message: str) -> None:
            print(f"[{time.monotonic() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

        yield say
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description)
        yield lambda message: bar.update(task, description=message)


def _init_checkpoint(args: argparse.Namespace, console: Console) -> int:
    cfg = preset(args.preset) if args.preset else ModelConfig.from_json(args.config)
    with _progress(console, f"writing {cfg.layer_pattern()} checkpoint to {args.out}"):
        out = write_synthetic(cfg, args.out, seed=args.seed, overwrite=args.overwrite, device=args.device)
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


def _is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _score(args: argparse.Namespace, console: Console) -> int:
    text = _read_text(args.text) if args.text else None
    tokens = _score_tokens(args, text)
    source = args.text or args.token_ids
    result = _score_artifact(args, tokens, source, console) if _is_artifact(args.checkpoint) else _score_checkpoint(
        args, tokens, source, console)
    console.print(f"tokens {tokens.numel()}  predicted {result.predicted}  mean NLL {result.mean_nll:.6f}  "
                  f"perplexity {result.perplexity:.4f}", highlight=False, soft_wrap=True)
    if text is not None:
        size = len(text.encode())
        per_byte = math.exp(result.mean_nll * result.predicted / size)
        console.print(f"text {size} bytes  perplexity per byte {per_byte:.4f}", highlight=False, soft_wrap=True)
    if args.logits_out:
        _save_logits(result.logits, tokens, args.logits_out)
        console.print(f"logits of every position written to {args.logits_out}")
    return 0


def _score_tokens(args: argparse.Namespace, text: str | None) -> torch.Tensor:
    """The ids to score: the token file's, or the text's through the checkpoint's or artifact's tokenizer;
    refused unless there is something to score and --decode-from lies inside them."""
    if text is None:
        tokens, flag, source = read_token_ids(args.token_ids), "--token-ids", args.token_ids
    else:
        tokenizer = _required(_carried_tokenizer(args.checkpoint), args.checkpoint, "--text", "--token-ids")
        tokens = torch.tensor(encode(tokenizer, text), dtype=torch.long)
        flag, source = "--text", args.text
    if tokens.numel() < 2:
        raise ValueError(f"{flag} {source}: {tokens.numel()} token(s); scoring needs at least 2 (each position's "
                         f"logits predict the next token)")
    if args.decode_from is not None and args.decode_from > tokens.numel():
        raise ValueError(f"--decode-from {args.decode_from}: beyond the sequence ({tokens.numel()} tokens in "
                         f"{source})")
    return tokens


def _read_text(path: str) -> str:
    """A UTF-8 text file ('-': stdin); ValueError naming the file when it is not UTF-8."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--text {path}: not UTF-8 text ({error})") from None


def _carried_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer.json a checkpoint or artifact carries (checked against the model's vocab_size), or None."""
    if _is_artifact(path):
        from dsv4c.runtime.loader import load_tokenizer

        return load_tokenizer(path)
    return folder_tokenizer(path, Checkpoint.open(path).config.vocab_size)


def _required(tokenizer: Tokenizer | None, path: str, flag: str, instead: str) -> Tokenizer:
    """`tokenizer`, or a ValueError naming `flag` when `path` carries none."""
    if tokenizer is None:
        raise ValueError(f"{flag}: {path} carries no {TOKENIZER_NAME}, so it cannot turn text into tokens; "
                         f"give token ids with {instead}")
    return tokenizer


def _encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError(f"--prompt {text!r}: the tokenizer turns it into no tokens; give some text")
    return ids


def _score_artifact(args: argparse.Namespace, tokens: torch.Tensor, source: str, console: Console):
    from dsv4c.runtime.loader import load

    engine = load(args.checkpoint, args.device)
    vocab = engine.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise ValueError(f"{source}: token ids must lie in [0, {vocab})")
    if tokens.numel() > engine.max_seq_len:
        raise ValueError(f"{source}: {tokens.numel()} tokens; the artifact holds {engine.max_seq_len}")
    with _progress(console, f"scoring {tokens.numel()} tokens"):
        logits = runner_logits(engine.runner, engine.prefill_row(), tokens, engine.prefill_chunk, args.decode_from)
    return score_logits(logits, tokens)


def _score_checkpoint(args: argparse.Namespace, tokens: torch.Tensor, source: str, console: Console):
    ckpt = Checkpoint.open(args.checkpoint)
    cfg = ckpt.config
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"{source}: token ids must lie in [0, {cfg.vocab_size})")
    num = _numerics(args)
    with _progress(console, "loading weights"):
        weights = dequantize_weights({name: ckpt.get(name) for name in ckpt.headers}, num)
        weights = {k: v.to(args.device) for k, v in weights.items()}
    with _progress(console, f"scoring {tokens.numel()} tokens"):
        return score(weights, cfg, num, tokens, chunk=args.chunk, decode_from=args.decode_from)


def _numerics(args: argparse.Namespace) -> Numerics:
    dtype = _DTYPES[args.dtype]
    return Numerics(dtype=dtype) if args.numerics == "faithful" else Numerics.plain(dtype)


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


def _compile(args: argparse.Namespace, console: Console) -> int:
    if args.max_seq_len is not None and args.max_seq_len < args.prefill_chunk:
        raise ValueError(f"--max-seq-len {args.max_seq_len}: less than --prefill-chunk {args.prefill_chunk}; "
                         f"a prefill chunk must fit in the cache")
    from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint

    options = CompileOptions(targets=args.target, numerics=_numerics(args), max_seq_len=args.max_seq_len,
                             prefill_chunk=args.prefill_chunk, mtp=not args.no_mtp, debug=args.debug,
                             moe=args.moe, jobs=args.jobs)
    with _progress(console, "compiling") as update:
        out = compile_checkpoint(args.checkpoint, args.output, options, overwrite=args.overwrite, progress=update)
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


def _generate(args: argparse.Namespace, console: Console) -> int:
    from dsv4c.runtime.loader import load, load_tokenizer
    from dsv4c.runtime.sampler import SamplingParams

    tokenizer = None
    if args.prompt:
        tokenizer = _required(load_tokenizer(args.artifact), args.artifact, "--prompt", "--prompt-ids")
    prompts = args.prompt_ids if tokenizer is None else [_encode_prompt(tokenizer, text) for text in args.prompt]
    engine = load(args.artifact, args.device, max_batch=len(prompts), cuda_graphs=not args.no_cuda_graphs)
    if any(max(prompt) >= engine.vocab_size or min(prompt) < 0 for prompt in prompts):
        raise ValueError(f"--prompt-ids: ids must lie in [0, {engine.vocab_size})")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    streaming = tokenizer is not None and len(prompts) == 1 and not args.json
    if streaming:  # one text prompt: its text as the tokens come
        stream = TextStream(tokenizer)
        console.file.write(args.prompt[0])
        result = engine.generate(prompts, args.max_new_tokens, sampling, mtp=args.mtp, seed=args.seed,
                                 on_token=lambda _, token: _write_now(console, stream.push([token])))
        _write_now(console, stream.flush() + "\n")
    else:
        with _progress(console, f"generating {args.max_new_tokens} tokens for {len(prompts)} prompt(s)"):
            result = engine.generate(prompts, args.max_new_tokens, sampling, mtp=args.mtp, seed=args.seed)
    report = {"tokens": result.tokens, "steps": result.steps, "drafted": result.drafted,
              "accepted": result.accepted, "rejected_nonfinite": result.rejected_nonfinite,
              "acceptance_rate": None if not result.drafted else result.acceptance_rate,
              "drafted_by_position": result.drafted_by_position, "accepted_by_position": result.accepted_by_position,
              "errors": {str(i): message for i, message in result.errors.items()}}
    for i, message in result.errors.items():
        print(f"dsv4c generate: prompt {i + 1}: {message}", file=sys.stderr)
    if tokenizer is not None:
        report["text"] = [decode(tokenizer, tokens) for tokens in result.tokens]
    if args.json:
        print(json.dumps(report))
        return 1 if result.errors else 0
    if tokenizer is not None and not streaming:  # a streamed prompt's text is already out
        for text, completion in zip(args.prompt, report["text"]):
            console.print(text + completion, markup=False, highlight=False, soft_wrap=True)
    elif tokenizer is None:
        for prompt, tokens in zip(prompts, result.tokens):
            console.print(f"{' '.join(map(str, prompt))} -> {' '.join(map(str, tokens))}", highlight=False,
                          soft_wrap=True)
    if args.mtp:
        rate = report["acceptance_rate"] or 0
        by_position = ", ".join(f"{a}/{d}" for a, d in zip(result.accepted_by_position, result.drafted_by_position))
        console.print(f"MTP: {result.accepted}/{result.drafted} drafts accepted ({rate:.1%}; by draft position "
                      f"{by_position}), {result.rejected_nonfinite} non-finite", highlight=False)
    return 1 if result.errors else 0


def _write_now(console: Console, text: str) -> None:
    console.file.write(text)
    console.file.flush()


@contextlib.contextmanager
def _demo_folder(workdir: str | None) -> Iterator[Path]:
    """`workdir`, kept; without one a new temporary folder, removed when the block ends however it ends."""
    if workdir:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="dsv4c-demo-") as folder:
        yield Path(folder)


def _demo(args: argparse.Namespace, console: Console) -> int:
    """The embedded trained model end to end: compile it, load it, generate text with and without MTP."""
    with _demo_folder(args.workdir) as root:
        same = _run_demo(root, args, console)
    if not args.workdir:
        console.print(f"removed {root} (--workdir DIR keeps the artifact)", highlight=False, soft_wrap=True)
    return 0 if same else 1


def _counted(update: Callable[[str], None], what: str, stages: int) -> Callable[[str], None]:
    """A progress callback that shows `what [i/stages] message` for the i-th message it hears."""
    heard = 0

    def say(message: str) -> None:
        nonlocal heard
        heard += 1
        update(f"{what} [{min(heard, stages)}/{stages}] {message}")
    return say


def _run_demo(root: Path, args: argparse.Namespace, console: Console) -> bool:
    """Whether MTP speculative decoding gave the plain greedy tokens."""
    from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
    from dsv4c.compiler.variant_compile import progress_messages
    from dsv4c.model.demo import DEMO_PROMPTS, demo_checkpoint
    from dsv4c.runtime.loader import load, load_tokenizer

    ckpt = demo_checkpoint()
    training = json.loads((ckpt / "training.json").read_text())["metrics"]
    pattern = Checkpoint.open(ckpt).config.layer_pattern()
    console.print(f"model       {ckpt}  ({pattern}, trained on the Python standard library's sources, byte-level; "
                  f"held-out perplexity per byte "
                  f"{training['perplexity_per_byte']:.2f}, unigram {training['unigram_perplexity_per_byte']:.2f}; "
                  "released layout: FP8 + MXFP4 + e8m0 scales)", highlight=False, soft_wrap=True)
    # the numerics it was trained in; one draft a step: the fewest step variants to capture (1 and 2 tokens)
    options = CompileOptions(numerics=Numerics.plain(torch.float32), max_seq_len=256, prefill_chunk=2, max_drafts=1,
                             jobs=cli_args.usable_cpus())
    started = time.perf_counter()
    with _progress(console, "compiling") as update:
        stages = progress_messages(options) + 2  # the variants' compiles, reading the weights, writing
        art = compile_checkpoint(ckpt, root / "demo.dsv4c", options, overwrite=True,
                                 progress=_counted(update, "compiling", stages))
    console.print(f"artifact    {art}  (compiled in {time.perf_counter() - started:.0f} s)", highlight=False,
                  soft_wrap=True)
    engine, tokenizer = load(art), load_tokenizer(art)
    prompts = [encode(tokenizer, text) for text in DEMO_PROMPTS]
    runs = {}
    for mtp in (0, 1):
        with _progress(console, f"generating {args.max_new_tokens} tokens for {len(prompts)} prompts, "
                                f"{'with' if mtp else 'without'} MTP"):
            started = time.perf_counter()
            runs[mtp] = (engine.generate(prompts, args.max_new_tokens, mtp=mtp), time.perf_counter() - started)
    for text, tokens in zip(DEMO_PROMPTS, runs[1][0].tokens):
        console.rule(style="dim")
        console.print(text + decode(tokenizer, tokens), markup=False, highlight=False, soft_wrap=True)
    console.rule(style="dim")
    made = len(prompts) * args.max_new_tokens
    (plain, plain_s), (spec, spec_s) = runs[0], runs[1]
    console.print(f"without MTP {made / plain_s:6.1f} tok/s ({len(prompts)} prompts x {args.max_new_tokens} tokens "
                  f"in {plain.steps} steps, {plain_s:.1f} s)", highlight=False, soft_wrap=True)
    console.print(f"with MTP    {made / spec_s:6.1f} tok/s ({spec.steps} verify steps, {spec_s:.1f} s); "
                  f"{spec.accepted}/{spec.drafted} drafts accepted ({spec.acceptance_rate:.0%}); "
                  f"identical to plain greedy decoding: {spec.tokens == plain.tokens}", highlight=False,
                  soft_wrap=True)
    return spec.tokens == plain.tokens


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from dsv4c.export.inspect_artifact import describe, export_onnx
    from dsv4c.runtime.artifact import load_artifact
    from dsv4c.runtime.capacity import MemoryBudget
    from dsv4c.runtime.device_memory import default_budget

    artifact = load_artifact(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=1))
    else:
        budget = MemoryBudget(args.memory, "--memory") if args.memory is not None else default_budget()
        console.print("\n".join(describe(artifact, budget)), highlight=False, soft_wrap=True)
    if args.onnx:
        variant = args.variant or ("main_t1" if "main_t1" in artifact.plans else sorted(artifact.plans)[0])
        export_onnx(artifact, variant, args.onnx)
        print(f"{variant} exported to {args.onnx} (fused ops in the 'dsv4c' domain; onnx.checker full check passed)",
              file=sys.stderr if args.json else sys.stdout)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it has none (None) or is an off switch (False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_command(sub, name: str, brief: str, description: str, run) -> argparse.ArgumentParser:
    """A subcommand `name` that calls `run(args, console)`; `brief` is its line in `dsv4c --help`."""
    parser = sub.add_parser(name, help=brief, description=description, formatter_class=_HelpFormatter)
    parser.set_defaults(run=run)
    return parser


def _add_numerics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numerics", choices=("faithful", "plain"), default="faithful",
                        help="faithful: DeepSeek's roundings (FP8 activations before FP8/FP4 matmuls, FP8 cached "
                             "KV, Hadamard + FP4 indexer); plain: no rounding at all")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activation dtype")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=cli_args.positive_int, default=DEFAULT_THREADS, metavar="N",
                        help="torch CPU threads; 1 is fastest for decode-sized steps (many small ops, where "
                             "OpenMP barriers outweigh a second thread)")


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=cli_args.device, default="cpu", metavar="DEV",
                        help="torch device: cpu, cuda, cuda:N")


def _demo_parser(sub) -> None:
    demo = _add_command(sub, "demo", "the embedded trained model: compile, load, generate text with MTP, report",
                        "Compile the embedded demo model (trained on the Python standard library's sources) for the "
                        "CPU, load the artifact and generate from a few Python-ish prompts with and without MTP "
                        "speculative decoding: the text, tokens per second and the drafts accepted.", _demo)
    demo.add_argument("--workdir", metavar="DIR",
                      help="where to write the artifact, kept (default: a temporary folder, removed)")
    demo.add_argument("--max-new-tokens", type=cli_args.positive_int, default=48, metavar="N",
                      help="tokens (bytes) to generate for each prompt")
    _add_threads_argument(demo)


def _init_parser(sub) -> None:
    init = _add_command(sub, "init-checkpoint", "write a synthetic checkpoint in the released layout",
                        "Write seeded random weights in DeepSeek-V4's released checkpoint layout (FP8 e4m3 with "
                        "e8m0 block scales, MXFP4 experts, sharded safetensors).", _init_checkpoint)
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    source.add_argument("--config", type=cli_args.input_file, metavar="FILE.json",
                        help="a config.json (released or transformers naming)")
    init.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    init.add_argument("--overwrite", action="store_true",
                      help="replace an existing checkpoint at OUT (a folder with a config.json; nothing else)")
    _add_device_argument(init)  # where the weights are generated: the same bytes on any device
    init.add_argument("out", metavar="OUT", help="checkpoint folder to create")


def _info_parser(sub) -> None:
    info = _add_command(sub, "info", "summarise a checkpoint (reads headers only)",
                        "Config summary, parameter and byte counts by dtype, the layer pattern (W window, C "
                        "compressed sparse, H heavily compressed; lower case: hash-routed).", _info)
    info.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder")


def _score_parser(sub) -> None:
    sc = _add_command(sub, "score", "mean NLL and perplexity of a token sequence",
                      "Run the reference model (checkpoint) or the compiled plans (artifact) over a token sequence: "
                      "prefill in chunks, then token by token from --decode-from; print mean NLL and perplexity.",
                      _score)
    sc.add_argument("checkpoint", metavar="CKPT|ART", help="a checkpoint folder or a compiled artifact")
    tokens = sc.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--token-ids", type=cli_args.input_file_or_stdin, metavar="FILE",
                        help="whitespace-separated token ids, at least 2 ('-': stdin)")
    tokens.add_argument("--text", type=cli_args.input_file_or_stdin, metavar="FILE",
                        help=f"UTF-8 text ('-': stdin), encoded with the checkpoint's or artifact's {TOKENIZER_NAME}; "
                             "also prints the perplexity per byte")
    sc.add_argument("--logits-out", type=cli_args.output_file, metavar="FILE.safetensors",
                    help="save every position's logits (its folder must exist)")
    sc.add_argument("--decode-from", type=cli_args.non_negative_int, metavar="N",
                    help="prefill N tokens, then decode one at a time (default: prefill them all)")
    sc.add_argument("--chunk", type=cli_args.positive_int, default=256, metavar="N",
                    help="prefill chunk size (checkpoints; an artifact uses its own)")
    _add_numerics_arguments(sc)
    _add_device_argument(sc)
    _add_threads_argument(sc)


def _compile_parser(sub) -> None:
    comp = _add_command(sub, "compile", "compile a checkpoint into an artifact",
                        "Capture the decode step (and its MTP and prefill variants), run the target's passes, and "
                        "write an artifact folder (plans, weights, manifest) atomically.", _compile)
    comp.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder")
    comp.add_argument("-o", "--output", required=True, metavar="ART",
                      help="artifact folder to create (never the checkpoint, inside it, or around it)")
    comp.add_argument("--target", type=cli_args.targets, default="cpu", metavar="LIST",
                      help="comma-separated targets: cpu, h100, h200, b200, gb300 (or sm_90a, sm_100a, sm_103a)")
    comp.add_argument("--explain", action="store_true", help="print the pass log: what each pass matched and changed")
    _add_numerics_arguments(comp)
    comp.add_argument("--max-seq-len", type=cli_args.positive_int, default=None, metavar="N",
                      help="cache capacity per sequence, at least --prefill-chunk and at most the model's "
                           "max_position_embeddings (default: that, capped at 4096)")
    comp.add_argument("--prefill-chunk", type=cli_args.positive_int, default=32, metavar="N",
                      help="tokens per prefill step")
    comp.add_argument("--no-mtp", action="store_true", help="leave out the MTP variants")
    comp.add_argument("--moe", choices=("w4a8", "w4a16", "w4a4", "unfused"), default=None,
                      help="the fused MoE's routed activations (default: the graph's numerics on GPU targets; "
                           "w4a4 changes them; unfused keeps routed_moe and the shared expert's FP8 linears)")
    comp.add_argument("--jobs", type=cli_args.positive_int, default=cli_args.usable_cpus(), metavar="N",
                      help="processes compiling the step variants (default: the CPUs this process may use)")
    comp.add_argument("--debug", action="store_true", help="check every pass on random inputs (slow)")
    comp.add_argument("--overwrite", action="store_true",
                      help="replace an existing artifact at ART (a folder with an artifact manifest; nothing else)")
    _add_threads_argument(comp)


def _generate_parser(sub) -> None:
    gen = _add_command(sub, "generate", "generate tokens with a compiled artifact",
                       "Batched generation: greedy (default) or temperature/top-p sampling, with optional MTP "
                       "speculative decoding (up to three draft tokens a step).", _generate)
    gen.add_argument("artifact", metavar="ART", help="a compiled artifact folder")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", action="append", type=cli_args.prompt_ids, metavar="IDS",
                        help="token ids ('1 2 3', '1,2,3' or @FILE); repeat for a batch")
    prompt.add_argument("--prompt", action="append", metavar="TEXT",
                        help=f"text, encoded with the artifact's {TOKENIZER_NAME}; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=cli_args.positive_int, default=32, metavar="N",
                     help="tokens to generate for each prompt")
    gen.add_argument("--mtp", type=int, choices=range(MAX_DRAFTS + 1), default=0, metavar="K",
                     help=f"MTP draft tokens per step, 0 to {MAX_DRAFTS} (at most the artifact's max_drafts)")
    gen.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed")
    gen.add_argument("--temperature", type=cli_args.temperature, default=0.0, metavar="T", help="0 is greedy")
    gen.add_argument("--top-p", type=cli_args.top_p, default=1.0, metavar="P",
                     help="sample from the smallest set of tokens whose probability reaches P")
    gen.add_argument("--json", action="store_true", help="print tokens and acceptance counts as JSON")
    gen.add_argument("--no-cuda-graphs", action="store_true",
                     help="run each step op by op instead of replaying its CUDA graph (for debugging; same tokens)")
    _add_device_argument(gen)
    _add_threads_argument(gen)


def _inspect_parser(sub) -> None:
    ins = _add_command(sub, "inspect", "passes applied, ops per variant, memory plan, kernels; ONNX export",
                       "Describe a compiled artifact (it is verified first): a line per pass and per kernel (name, "
                       "target, the launches that run it). Optionally export one step variant's optimised graph to "
                       "ONNX, fused ops in a 'dsv4c' custom domain.", _inspect)
    ins.add_argument("artifact", metavar="ART", help="a compiled artifact folder")
    ins.add_argument("--json", action="store_true", help="print the whole manifest as JSON (full kernel metadata)")
    ins.add_argument("--onnx", metavar="FILE", help="write the variant's graph as ONNX (checked with onnx.checker)")
    ins.add_argument("--variant", metavar="NAME", help="which step variant to export (default: main_t1)")
    ins.add_argument("--memory", type=cli_args.memory_size, metavar="SIZE",
                     help="device memory for the capacity table, e.g. 80GiB (default: the GPU's free memory, else "
                          "this machine's RAM)")


def _bench(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from dsv4c.compiler import benchmark

    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        raise benchmark.BenchError("--plot: matplotlib is not installed (pip install matplotlib)")
    if (args.artifact is None) == (args.report is None):
        raise benchmark.BenchError("bench: give an artifact to time, or --report FILE to show a saved report")
    if args.report is not None:
        if args.json or args.profile:
            raise benchmark.BenchError("--report: shows a saved report (no --json, no --profile)")
        report = benchmark.read_report(args.report)
    else:
        options = benchmark.BenchOptions(context=args.context, batches=args.batch, mtp=args.mtp,
                                         baselines=args.baselines, steps=args.steps,
                                         inductor_modes=args.inductor_mode)
        with _progress(console, "benchmarking") as say:
            report = benchmark.bench(args.artifact, options, progress=say)
    table = Table(title=benchmark.report_title(report))
    for column in benchmark.TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for row in benchmark.table_rows(report):
        table.add_row(*row)
    console.print(table)
    for line in benchmark.check_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    if args.json:
        benchmark.write_json(report, args.json)
    if args.plot:
        benchmark.plot(report, args.plot)
    if args.profile:
        for line in benchmark.profile_lines(args.artifact, max(args.batch)):
            console.print(line, highlight=False, soft_wrap=True)
    return 0


def _bench_parser(sub) -> None:
    ben = _add_command(sub, "bench", "time the compiled decode step on a GPU against its byte floor and baselines",
                       "Fill a context, check each variant's logits against the eager reference's over the same "
                       "tokens, then time the decode step (CUDA-graph replays) per batch and MTP setting: step ms, "
                       "tok/s/user, "
                       "tok/s/GPU, the bytes the step must read, bandwidth, measured/floor; baselines in the same "
                       "run. With --report, the table (and --plot) of a saved --json report, without a GPU.", _bench)
    ben.add_argument("artifact", metavar="ART", nargs="?", help="a compiled artifact folder")
    ben.add_argument("--context", type=cli_args.positive_int, default=4096, metavar="N",
                     help="tokens of context each sequence holds before timing")
    ben.add_argument("--batch", type=cli_args.positive_int_list, default=(1, 8, 32, 64), metavar="B,B",
                     help="batch sizes to time")
    ben.add_argument("--mtp", type=cli_args.non_negative_int_list, default=(0, 1), metavar="K,K",
                     help="draft tokens per step to time")
    ben.add_argument("--baselines", type=cli_args.name_list, default=("eager",), metavar="NAMES",
                     help="timed in the same run: eager, inductor, transformers")
    ben.add_argument("--inductor-mode", type=cli_args.name_list, default=("max-autotune",), metavar="MODES",
                     help="the torch.compile modes of the inductor baseline, a row each: max-autotune (default), "
                          "reduce-overhead, default")
    ben.add_argument("--steps", type=cli_args.positive_int, default=30, metavar="N", help="timed steps per row")
    ben.add_argument("--json", type=cli_args.output_file, metavar="FILE", help="write the report as JSON")
    ben.add_argument("--plot", type=cli_args.output_file, metavar="FILE.png",
                     help="draw tok/s/GPU against tok/s/user (matplotlib)")
    ben.add_argument("--profile", action="store_true", help="print the top kernels of one decode step")
    ben.add_argument("--report", metavar="FILE", help="show the table (and --plot) of a report --json wrote; times "
                     "nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dsv4c", description="A compiler for the decode step of DeepSeek-V4 models.",
                           formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=cli_args.version_text(),
                        help="print the versions of dsv4c, torch and triton")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (dsv4c COMMAND --help lists its flags)")
    for add in (_demo_parser, _init_parser, _info_parser, _score_parser, _compile_parser, _generate_parser,
                _inspect_parser, _bench_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else 2
    if "threads" in args:
        torch.set_num_threads(args.threads)
    try:
        return args.run(args, Console())
    except KeyboardInterrupt:
        print(f"dsv4c {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except INPUT_ERRORS as error:
        print(f"dsv4c {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
