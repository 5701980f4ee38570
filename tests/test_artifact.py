"""Artifacts: written atomically, verified completely, loaded without pickle.

Every refusal must name what it refuses (the file or the field); an interrupted or killed writer must
leave nothing at the target path.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.runtime import artifact, artifact_io
from dsv4c.runtime.artifact import ArtifactError, describe_numerics, load_artifact, write_artifact
from dsv4c.runtime.executor import Executor, weight_inputs
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref

SHARD_BYTES = 1 << 20  # small, so the big tensor below lands in its own shard


def small_plan() -> Plan:
    """out = x @ weights.proj + table (a constant)."""
    ops = (PlanOp("aten::mm.default", (Ref("x"), Ref("weights.proj")), {}, ("y",), ("x", "weights.proj")),
           PlanOp("aten::add.Tensor", (Ref("y"), Ref("table")), {}, ("out",), ("y", "table")))
    plan = Plan((PlanInput("weights.proj", (4, 4), "float32"), PlanInput("x", ("B", 4), "float32")),
                {"table": "constants.table"}, ops, (("out", "out"),))
    return Plan.from_dict(plan.to_dict())


def manifest_fields() -> dict:
    return {"config": tiny().to_dict(), "numerics": describe_numerics(Numerics.plain(torch.float32)),
            "targets": ["cpu"], "pass_log": [{"pass": "cleanup", "matches": 0}], "kernels": {}}


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"proj": torch.randn(4, 4, generator=g), "constants.table": torch.randn(4, generator=g),
            "big": torch.randn(300_000, generator=g), "codes": torch.arange(10, dtype=torch.uint8)}


@pytest.fixture
def written(tmp_path) -> Path:
    extra = {"kernels/cpu/README.txt": b"no kernels yet\n"}
    return write_artifact(tmp_path / "small.dsv4c", manifest_fields(), {"small": small_plan()}, tensors(),
                          extra, shard_bytes=SHARD_BYTES)


def weight_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "weights").iterdir())


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(written):
    art = load_artifact(written)
    assert art.plans == {"small": small_plan()}
    assert art.manifest["format_version"] == 1 and art.manifest["targets"] == ["cpu"]
    assert art.manifest["versions"]["torch"] == torch.__version__
    assert art.manifest["numerics"]["dtype"] == "float32"
    assert len(weight_files(written)) == 3, "the big tensor (1.2 MB) must sit in a shard of its own"
    expected = tensors()
    assert sorted(art.weights) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(art.weights[key], value) and art.weights[key].dtype == value.dtype
    loaded = art.weights.load_all()
    executor = Executor(art.plans["small"], loaded, "cpu", bound_inputs=weight_inputs(art.plans["small"], loaded))
    x = torch.randn(3, 4)
    assert torch.equal(executor.run({"x": x})["out"], x @ expected["proj"] + expected["constants.table"])


def test_read_opens_each_weight_file_once(written, monkeypatch):
    """`WeightStore.read` reads many tensors with one open of each file (a Flash-size file's header lists
    thousands of tensors); it gives what reading each tensor alone gives, and KeyError for a name it lacks."""
    store = load_artifact(written).weights
    opened = []
    real_open = artifact_io.safe_open
    monkeypatch.setattr(artifact_io, "safe_open", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    read = store.read(store)
    assert sorted(opened) == sorted(str(written / rel) for rel in weight_files(written))
    assert sorted(read) == sorted(tensors())
    for key, value in tensors().items():
        assert torch.equal(read[key], value) and read[key].dtype == value.dtype and read[key].data_ptr() % 64 == 0
    with pytest.raises(KeyError, match="absent"):
        store.read(["proj", "absent"])


def test_manifest_lists_every_file_with_its_hash(written):
    files = json.loads((written / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    for rel, record in files.items():
        assert record["bytes"] == (written / rel).stat().st_size
        assert record["sha256"] == artifact.sha256_file(written / rel)


def test_tampered_byte_is_refused_naming_the_file(written):
    rel = weight_files(written)[0]
    data = bytearray((written / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (written / rel).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"file '{rel}' does not match its sha256"):
        load_artifact(written)


def test_truncated_file_is_refused(written):
    rel = weight_files(written)[-1]
    with open(written / rel, "rb+") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match=f"file '{rel}' has 100 bytes.*truncated"):
        load_artifact(written)


@pytest.mark.parametrize("version", [2, "1", None])
def test_unknown_format_version_is_refused_naming_the_field(written, version):
    edit_manifest(written, lambda m: m.update(format_version=version))
    with pytest.raises(ArtifactError, match="manifest.json: field 'format_version'"):
        load_artifact(written)


def test_missing_and_unlisted_files_are_refused(written):
    edit_manifest(written, lambda m: m["files"].update({"kernels/cpu/gone.bin": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(ArtifactError, match=r"missing: \['kernels/cpu/gone.bin'\]"):
        load_artifact(written)
    edit_manifest(written, lambda m: m["files"].pop("kernels/cpu/gone.bin"))
    load_artifact(written)
    (written / "kernels" / "cpu" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"not listed in manifest.json: \['kernels/cpu/stray.bin'\]"):
        load_artifact(written)


def test_malformed_json_is_refused_naming_the_file(written):
    plan_bytes = b'{"format_version": 1, "inputs": ['
    (written / "plans" / "small.json").write_bytes(plan_bytes)
    record = {"sha256": __import__("hashlib").sha256(plan_bytes).hexdigest(), "bytes": len(plan_bytes)}
    edit_manifest(written, lambda m: m["files"].update({"plans/small.json": record}))
    with pytest.raises(ArtifactError, match="plans/small.json: not valid JSON"):
        load_artifact(written)
    (written / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        load_artifact(written)


def test_paths_escaping_the_artifact_are_refused(written, tmp_path):
    edit_manifest(written, lambda m: m["files"].update({"../outside": {"sha256": "0" * 64, "bytes": 0}}))
    with pytest.raises(ArtifactError, match="'../outside' is not a plain relative path"):
        load_artifact(written)
    with pytest.raises(ArtifactError, match="extra file: '/etc/x' is not a plain relative path"):
        write_artifact(tmp_path / "other", manifest_fields(), {}, {}, {"/etc/x": b""})


def test_write_refuses_bad_input_before_writing(tmp_path):
    target = tmp_path / "bad.dsv4c"
    fields = manifest_fields()
    del fields["targets"]
    with pytest.raises(ArtifactError, match=r"manifest fields missing: \['targets'\]"):
        write_artifact(target, fields, {}, {})
    with pytest.raises(ArtifactError, match=r"variant 'small': tensors missing from the weights: \['proj'\]"):
        write_artifact(target, manifest_fields(), {"small": small_plan()}, {"constants.table": torch.ones(4)})
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_existing_target_is_refused_unless_overwrite(written):
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(written, manifest_fields(), {}, {})
    write_artifact(written, manifest_fields(), {}, {"only": torch.zeros(2)}, overwrite=True)
    assert list(load_artifact(written).weights) == ["only"]
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_weight_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(tmp_path / "cut.dsv4c", manifest_fields(), {"small": small_plan()}, tensors())
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import sys, time
from dsv4c.runtime import artifact, artifact_io
from dsv4c.runtime.plan import Plan
import torch

original = artifact.write_weight_shards
def stall_after_weights(*args, **kwargs):
    written = original(*args, **kwargs)
    print("weights written", flush=True)
    time.sleep(60)
    return written

artifact.write_weight_shards = stall_after_weights
fields = {"config": {}, "numerics": {}, "targets": [], "pass_log": [], "kernels": {}}
plan = Plan.from_json(open(sys.argv[2]).read())
tensors = {"proj": torch.ones(4, 4), "constants.table": torch.ones(4)}
artifact.write_artifact(sys.argv[1], fields, {"small": plan}, tensors)
"""


def test_killed_writer_leaves_nothing_at_target(tmp_path):
    plan_file, target = tmp_path / "plan.json", tmp_path / "out" / "killed.dsv4c"
    plan_file.write_text(small_plan().to_json())
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(plan_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "weights written", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert [p.name.startswith(".killed.dsv4c.partial-") for p in leftovers] == [True], "writer stopped midway"
    assert (leftovers[0] / "plans" / "small.json").exists() and not (leftovers[0] / "manifest.json").exists()


def test_loading_never_unpickles(written, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle or torch.load used while loading an artifact")

    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    art = load_artifact(written)
    loaded = art.weights.load_all()
    assert torch.equal(art.weights["proj"], loaded["proj"])
    Executor(art.plans["small"], loaded, "cpu", bound_inputs=weight_inputs(art.plans["small"], loaded))


def test_runtime_imports_no_compiler():
    """The runtime loads and runs artifacts without the passes, the capture or the reference model."""
    code = ("import sys, dsv4c.runtime.plan, dsv4c.runtime.executor, dsv4c.runtime.artifact\n"
            "bad = [m for m in sys.modules if m.startswith(('dsv4c.passes', 'dsv4c.compiler.capture', "
            "'dsv4c.model.step', 'dsv4c.compiler.lowering')) or m == 'triton']\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
