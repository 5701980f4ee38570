"""A compile spread over worker processes (compiler/variant_compile.py) writes the artifact a single-process
compile writes: the same plans, bit-equal tensors, the same pass log but for its capture times."""

from __future__ import annotations

import json

import pytest
import torch

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.compiler.variant_compile import VariantError, _refusal, _Workers, progress_messages
from dsv4c.model.checkpoint import Checkpoint, CheckpointError, write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.runtime.artifact import load_artifact


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0))  # one C4 layer: capture is the slow part
    return write_synthetic(cfg, tmp_path_factory.mktemp("parallel") / "ckpt", seed=5)


def _options(jobs: int) -> CompileOptions:
    return CompileOptions(numerics=Numerics(), max_seq_len=64, prefill_chunk=2, mtp=False,
                          jobs=jobs)  # variants main_t1, main_t2


@pytest.fixture(scope="module")
def artifacts(checkpoint):
    root, ckpt = checkpoint.parent, checkpoint
    out = {}
    for jobs in (1, 2):
        options = _options(jobs)
        said = []
        out[jobs] = load_artifact(compile_checkpoint(ckpt, root / f"art{jobs}", options, progress=said.append))
        assert len(said) == progress_messages(options) + 2, said  # + reading the weights, writing (the demo's count)
    assert said[0] == "capturing and optimising 2 variants in 2 processes"  # the second compile ran in workers
    assert sorted(said[1:3]) == ["compiled main_t1", "compiled main_t2"]
    return out


def _without_times(log: list[dict]) -> list[dict]:
    """The pass log less its wall-clock fields (the variant's capture time, each pass's)."""
    return [{**{k: v for k, v in entry.items() if k != "capture_s"},
             "passes": [{k: v for k, v in record.items() if k != "wall_s"} for record in entry["passes"]]}
            for entry in log]


def test_plans_equal(artifacts):
    one, many = artifacts[1], artifacts[2]
    assert list(one.plans) == list(many.plans) and len(one.plans) == 2
    for name in one.plans:
        assert one.plans[name].to_json() == many.plans[name].to_json(), name


def test_tensors_bit_equal(artifacts):
    one, many = artifacts[1].weights, artifacts[2].weights
    assert sorted(one) == sorted(many)
    constants = [k for k in one if "__" in k]
    assert constants, "the variants' graph constants are in the artifact"
    for key in one:
        a, b = one[key], many[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def test_pass_log_equal_but_capture_times(artifacts):
    one, many = (a.manifest["pass_log"] for a in (artifacts[1], artifacts[2]))
    assert json.dumps(_without_times(one)) == json.dumps(_without_times(many))
    assert all(entry["capture_s"] > 0 for entry in one + many)


def test_jobs_must_be_positive_and_options_round_trip_through_json():
    with pytest.raises(ValueError, match="jobs"):
        CompileOptions(jobs=0)
    options = CompileOptions(targets=("h100", "gb300"), numerics=Numerics.plain(torch.float32), max_seq_len=96,
                             moe="w4a4", kernel_batches=(1, 8), jobs=3)
    assert CompileOptions.from_json(json.loads(json.dumps(options.to_json()))) == options


def test_a_worker_refusing_its_input_names_its_variant_in_one_line(tmp_path):
    """A checkpoint that is not there: the CheckpointError's message, as a one-job compile reports it."""
    request = {"checkpoint": str(tmp_path / "gone"), "options": CompileOptions().to_json(),
               "variant": {"kind": "main", "tokens": 1}, "pipeline": "cpu", "served": ["cpu"],
               "folder": str(tmp_path / "out")}
    with pytest.raises(VariantError, match=r"^variant main_t1: [^\n]*gone[^\n]*$") as refused:
        _Workers().run(request)
    with pytest.raises(CheckpointError) as direct:
        Checkpoint.open(tmp_path / "gone")
    assert str(refused.value) == f"variant main_t1: {direct.value}"


def test_a_failing_worker_names_its_variant_and_shows_its_traceback(checkpoint, tmp_path):
    """Anything but a refusal is a bug: the worker's exit status and its traceback's tail."""
    request = {"checkpoint": str(checkpoint), "options": CompileOptions().to_json(),
               "variant": {"kind": "main", "tokens": 1}, "pipeline": "cpu", "served": None,
               "folder": str(tmp_path / "out")}
    with pytest.raises(RuntimeError, match=r"(?s)variant main_t1 of .*worker exit status 1.*TypeError"):
        _Workers().run(request)


def test_a_worker_passes_on_the_pass_dumps(checkpoint, tmp_path, monkeypatch, capsys):
    """`DSV4C_DUMP=1` prints each pass's dump from the workers too, as a one-job compile prints it."""
    monkeypatch.setenv("DSV4C_DUMP", "1")
    request = {"checkpoint": str(checkpoint), "options": _options(2).to_json(), "pipeline": "cpu",
               "variant": {"kind": "main", "tokens": 1}, "served": ["cpu"], "folder": str(tmp_path / "main_t1")}
    _Workers().run(request)
    assert "[dsv4c] dead_code: " in capsys.readouterr().err


@pytest.mark.parametrize("stdout, message", [
    ('{"error": "config.json: no field vocab_size"}\n', "config.json: no field vocab_size"),
    ('a stray line\n{"error": "x"}\n', "x"), ("", None), ("not json\n", None), ('["error"]\n', None),
    ('{"other": 1}\n', None)])
def test_only_a_worker_that_said_why_is_a_refusal(stdout, message):
    """A worker exiting with the refusal status without its JSON line falls back to the traceback's tail."""
    assert _refusal(stdout) == message
