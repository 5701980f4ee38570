"""`dsv4c bench`'s refusals (CPU): each a single line naming the flag, before any work."""

import json

import pytest

from dsv4c.compiler.benchmark import BenchError, BenchOptions, validate
from dsv4c.compiler.cli import main

MANIFEST = {"max_seq_len": 4224, "mtp": True}


@pytest.mark.parametrize("options, flag", [
    (BenchOptions(batches=(1, 256)), "--batch"),
    (BenchOptions(context=4200), "--context"),
    (BenchOptions(mtp=(0, 2)), "--mtp"),
    (BenchOptions(baselines=("eager", "vllm")), "--baselines"),
    (BenchOptions(baselines=("inductor",), inductor_modes=("reduce-overhead", "fastest")), "--inductor-mode"),
    (BenchOptions(inductor_modes=()), "--inductor-mode"),
])
def test_what_the_artifact_cannot_run_is_refused_naming_the_flag(options, flag):
    with pytest.raises(BenchError, match=flag):
        validate(MANIFEST, options)


def test_a_one_draft_artifact_refuses_more_drafts_and_a_draftless_one_any():
    validate(MANIFEST, BenchOptions(mtp=(0, 1)))
    with pytest.raises(BenchError, match="at most 0"):
        validate({"max_seq_len": 4224, "mtp": False}, BenchOptions(mtp=(1,)))


def test_bench_on_a_machine_without_a_gpu_says_what_it_needs(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_a_plot_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "matplotlib" else find_spec(name, *rest))
    assert main(["bench", str(tmp_path), "--plot", str(tmp_path / "step.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot: matplotlib is not installed" in err and len(err.strip().splitlines()) == 1


def test_timed_runs_warmup_then_steps_and_takes_medians(monkeypatch):
    """`timed` (what every bench row goes through) calls the step warmup + steps times, in order, and returns
    the medians of the timed calls only (device events stubbed on this GPU-less machine: 2 ms each)."""
    import torch

    from dsv4c.compiler.benchmark import timed

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    device_ms, host_ms = timed(calls.append, steps=4, warmup=3)
    assert calls == list(range(7)) and device_ms == 2.0 and 0 <= host_ms < 1000


def _row(runner: str, batch: int, step_ms: float) -> dict:
    return {"runner": runner, "batch": batch, "mtp": 0, "step_ms": step_ms, "host_ms": 0.1,
            "tok_s_user": 1e3 / step_ms, "tok_s_gpu": batch * 1e3 / step_ms, "floor_bytes": 1e9,
            "bandwidth_gb_s": 1.0 / step_ms, "measured_over_floor": 3.0, "tokens_match": runner == "dsv4c" or None}


def test_a_saved_report_is_shown_without_a_gpu(tmp_path, capsys, monkeypatch):
    """`--report` prints a --json report's table (the same rows a run prints), timing nothing."""
    from dsv4c.compiler.benchmark import write_json

    monkeypatch.setenv("COLUMNS", "200")  # rich's console: the whole table on one line a row

    report = {"artifact": "mini.dsv4c", "device": "NVIDIA H100 80GB HBM3", "versions": {}, "context": 4096,
              "copy_bandwidth_gb_s": 3000.0, "rows": [_row("dsv4c", 1, 1.97), _row("eager", 1, 81.3)], "tokens": {},
              "prefill": {"dsv4c": {"tokens": 4096, "chunk": 32, "ms": 512.0},
                          "eager": {"tokens": 4096, "chunk": 256, "ms": 8192.0}}}
    write_json(report, tmp_path / "step.json")
    assert main(["bench", "--report", str(tmp_path / "step.json")]) == 0
    out = capsys.readouterr().out
    assert "mini.dsv4c, NVIDIA H100 80GB HBM3, context 4096" in out
    assert "1.970" in out and "81.300" in out and "yes" in out
    assert ("prefill of the 4096-token context (one sequence, copied to every row): dsv4c 512.0 ms in chunks of 32 "
            "(8,000 tok/s); eager 8,192.0 ms in chunks of 256 (500 tok/s)") in out


@pytest.mark.parametrize("content, says", [
    ("{", "not a readable JSON report"),
    ("[]", "not a bench report"),
    ('{"device": "x", "context": 1, "copy_bandwidth_gb_s": 1}', "missing rows"),
    ('{"device": "x", "context": 1, "copy_bandwidth_gb_s": 1, "rows": [{"runner": "dsv4c"}]}', "row 0 lacks batch"),
    ('{"device": "x", "context": 1, "copy_bandwidth_gb_s": 1, "rows": [%s]}'
     % json.dumps({**_row("dsv4c", 1, 2.0), "step_ms": "fast"}), "row 0: step_ms of the wrong type"),
    ('{"device": "x", "context": 1, "copy_bandwidth_gb_s": 1, "rows": [%s]}'
     % json.dumps({**_row("dsv4c", 1, 2.0), "tokens_match": "x"}), "row 0: tokens_match of the wrong type"),
])
def test_a_report_that_is_not_one_is_refused_naming_the_file(tmp_path, capsys, content, says):
    (tmp_path / "r.json").write_text(content)
    assert main(["bench", "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "r.json") in err and says in err and len(err.strip().splitlines()) == 1


def test_bench_takes_an_artifact_or_a_report_not_both(tmp_path, capsys):
    assert main(["bench"]) == 2
    assert main(["bench", str(tmp_path), "--report", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.count("give an artifact to time, or --report FILE") == 2


def test_the_filled_context_is_one_prefill_copied_to_every_row_whatever_the_chunk():
    """`filled_state` (the bench's context, the eager baselines' in long chunks): every row holds the state a
    one-shot prefill of the context leaves, in fp32 to accumulation order, whether chunked by the engine's prefill
    length, by a longer chunk that does not divide the context, or not at all."""
    import torch

    from dsv4c.compiler.benchmark import filled_state
    from dsv4c.model.numerics import Numerics
    from dsv4c.model.presets import tiny
    from dsv4c.model.step import dequantize_weights
    from dsv4c.model.synthetic import synthetic_tensors
    from dsv4c.runtime.eager_runner import EagerRunner, state_specs
    from dsv4c.runtime.engine import Engine

    num = Numerics.plain(torch.float32)
    cfg = tiny().replace(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=0)
    runner = EagerRunner(dequantize_weights(dict(synthetic_tensors(cfg, seed=3)), num), cfg, num, invariant=False)
    engine = Engine(runner, state_specs(cfg, 64, num), prefill_chunk=2, max_seq_len=64, vocab_size=cfg.vocab_size)
    context = 23
    whole = {k: v.clone() for k, v in filled_state(engine, runner, 1, context, seed=0, chunk=context).items()}
    for chunk in (None, 8):
        state = filled_state(engine, runner, 3, context, seed=0, chunk=chunk)
        for name, value in state.items():
            assert not value.float().isnan().any(), name  # unwritten score slots hold -inf by design
            for row in range(3):
                torch.testing.assert_close(value[row], whole[name][0], rtol=1e-5, atol=1e-5, msg=name)
