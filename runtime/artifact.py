"""A compiled artifact: one folder, written atomically, verified completely before anything is used.

Layout:
    manifest.json                  format_version, versions, config, numerics, targets, pass_log, kernels,
                                   variants (name -> plan file), files (relative path -> sha256 and bytes)
    plans/<variant>.json           a `Plan` per step variant (runtime/plan.py)
    weights/model-<i>-of-<n>.safetensors   model weights by checkpoint name, plus `constants.*` graph constants
    kernels/<target>/...           optional, passed as extra files
    tokenizer.json                 optional, passed as an extra file: the checkpoint's tokenizer, copied as it is

`write_artifact` builds the folder beside the target and renames it into place, so the target holds a
whole artifact or nothing; `check_output_path` says before any work whether a path may receive one
(`overwrite` replaces only an existing artifact, and never an input). `load_artifact` refuses (naming the
file or field) an unknown format version, malformed JSON, a file missing from or absent in the manifest,
and any size or sha256 mismatch; it reads tensors with safetensors only and never unpickles. Nothing in an
artifact is executed. `artifact_tokenizer` reads the tokenizer an artifact carries after checking that one
file against the manifest, so text can be encoded before the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from tokenizers import Tokenizer

from dsv4c.model.tokenizer import TOKENIZER_NAME, read_tokenizer
from dsv4c.runtime.artifact_io import (DEFAULT_SHARD_BYTES, MANIFEST, WEIGHTS_DIR, ArtifactError,
                                       WeightStore, check_relpath, file_record, sha256_file, staging_dir,
                                       write_durable, write_weight_shards)
from dsv4c.runtime.plan import Plan, PlanError, decode_dtype
from dsv4c.runtime.state_pool import StateSpec

ARTIFACT_FORMAT_VERSION = 1
PLANS_DIR = "plans"
# Fields the caller supplies, with their JSON type; the writer adds the rest.
CALLER_FIELDS: Mapping[str, type] = {"config": dict, "numerics": dict, "targets": list, "pass_log": list,
                                     "kernels": dict}
WRITER_FIELDS = ("format_version", "versions", "variants", "files")
HASH_THREADS = 8  # files hashed at once when an artifact is verified
_VARIANT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
__all__ = ["ARTIFACT_FORMAT_VERSION", "Artifact", "ArtifactError", "TOKENIZER_NAME", "WeightStore",
           "artifact_tokenizer", "check_output_path", "describe_numerics", "is_artifact_folder", "load_artifact",
           "write_artifact"]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact: the manifest as read, a plan per variant, and the lazy weights."""

    path: Path
    manifest: dict[str, Any]
    plans: dict[str, Plan]
    weights: WeightStore


def describe_numerics(numerics: Any) -> dict[str, Any]:
    """A numerics dataclass (dtype plus switches) as manifest JSON: dtype by name, switches as they are."""
    out = {}
    for field in dataclasses.fields(numerics):
        value = getattr(numerics, field.name)
        out[field.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    return out


def write_artifact(path: str | os.PathLike, manifest_fields: Mapping[str, Any], plans: Mapping[str, Plan],
                   tensors: Mapping[str, torch.Tensor], extra_files: Mapping[str, bytes] | None = None, *,
                   overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an artifact folder at `path` atomically and return its path.

    `manifest_fields` holds `CALLER_FIELDS` (and may hold more JSON fields); `plans` maps variant names
    to plans; `tensors` maps weight names (and the plans' constant keys) to tensors; `extra_files` maps
    relative paths (e.g. `kernels/sm_90a/...`) to bytes. Refuses an existing `path` unless `overwrite`
    and `path` is an artifact (`check_output_path`).
    """
    target = check_output_path(path, overwrite)
    fields = _checked_fields(manifest_fields)
    extra = _checked_extra_files(extra_files or {})
    for name, plan in plans.items():
        _check_variant(name, plan, tensors)
    with staging_dir(target, overwrite) as root:
        files: dict[str, dict[str, Any]] = {}
        variants = _write_plans(root, plans, files)
        for rel in write_weight_shards(root, tensors, shard_bytes):
            files[rel] = file_record(root / rel)
        for rel, data in extra.items():
            write_durable(root / rel, data)
            files[rel] = file_record(root / rel)
        manifest = {"format_version": ARTIFACT_FORMAT_VERSION, "versions": _versions(), **fields,
                    "variants": variants, "files": dict(sorted(files.items()))}
        write_durable(root / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False).encode())
    return target


def check_output_path(path: str | os.PathLike, overwrite: bool,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """`path` as a Path if an artifact may be written there, else `ArtifactError` naming it; reads no more than
    a manifest, so a driver calls it before any work.

    Refused: `path` equal to one of `inputs`, inside one or containing one (links resolved); a path below a
    file; an existing path without `overwrite`; and, with `overwrite`, an existing path that is not an
    artifact folder (`is_artifact_folder`) or is a symbolic link: a folder of other files is never replaced.
    """
    target = Path(path)
    where = target.resolve()
    for source in inputs:
        given = Path(source).resolve()
        if where == given or given in where.parents or where in given.parents:
            relation = "is" if where == given else "lies inside" if given in where.parents else "contains"
            raise ArtifactError(f"{target}: {relation} the input {source}; write the artifact elsewhere")
    folder = next((p for p in where.parents if p.exists()), where)
    if not folder.is_dir():
        raise ArtifactError(f"{target}: {folder} is a file, not a folder")
    if not (target.exists() or target.is_symlink()):
        return target
    if not overwrite:
        raise ArtifactError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace an artifact")
    if target.is_symlink() or not is_artifact_folder(target):
        raise ArtifactError(f"{target}: exists and is not a dsv4c artifact (no {MANIFEST} with the fields "
                            f"{', '.join(WRITER_FIELDS)}); refusing to replace it")
    return target


def is_artifact_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder whose manifest is a JSON object with every field `write_artifact` writes
    (of any format version: an older artifact is still an artifact). Nothing else is verified."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_bytes())
    except (OSError, ValueError):  # missing or unreadable; not JSON (JSONDecodeError, UnicodeDecodeError)
        return False
    return isinstance(manifest, dict) and all(name in manifest for name in WRITER_FIELDS)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact folder; see the module docstring for what is refused."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact folder (no such directory)")
    manifest = _read_manifest(root)
    files = manifest["files"]
    _verify_files(root, files)
    plans = {}
    for name, rel in manifest["variants"].items():
        try:
            plans[name] = Plan.from_json((root / rel).read_bytes(), source=rel)
        except PlanError as error:
            raise ArtifactError(f"artifact {root}: {error}") from None
    weight_files = sorted(r for r in files if r.startswith(f"{WEIGHTS_DIR}/") and r.endswith(".safetensors"))
    weights = WeightStore(root, weight_files)
    for name, plan in plans.items():
        _check_variant(name, plan, weights)
    return Artifact(root, manifest, plans, weights)


def artifact_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer the artifact at `path` carries (`tokenizer.json`, listed in its manifest), or None without
    one. Only the manifest and that file are read: an ArtifactError when the file's size or sha256 does not match
    the manifest, a TokenizerError when its ids do not fit the model's vocab_size (each names the file)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact folder (no such directory)")
    manifest = _read_manifest(root)
    record = manifest["files"].get(TOKENIZER_NAME)
    if record is None:
        return None
    _verify_file(root, TOKENIZER_NAME, record)
    vocab_size = manifest["config"].get("vocab_size")
    if type(vocab_size) is not int:
        raise ArtifactError(f"artifact {root}: {MANIFEST}: field config.vocab_size is missing or not an integer")
    return read_tokenizer(root / TOKENIZER_NAME, vocab_size)


def _versions() -> dict[str, str | None]:
    return {"dsv4c": distribution_version("dsv4c"), "torch": torch.__version__,
            "triton": distribution_version("triton"), "python": platform.python_version()}


def distribution_version(name: str) -> str | None:
    """An installed distribution's version without importing it (importing triton has side effects)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _checked_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    missing = sorted(CALLER_FIELDS.keys() - fields.keys())
    if missing:
        raise ArtifactError(f"manifest fields missing: {missing}")
    for name, value in fields.items():
        if name in WRITER_FIELDS:
            raise ArtifactError(f"manifest field {name!r} is written by write_artifact itself")
        if name in CALLER_FIELDS and not isinstance(value, CALLER_FIELDS[name]):
            raise ArtifactError(f"manifest field {name!r} must be a {CALLER_FIELDS[name].__name__}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"manifest field {name!r} is not plain JSON ({error})") from None
        out[name] = value
    return out


def _checked_extra_files(extra: Mapping[str, bytes]) -> dict[str, bytes]:
    for rel, data in extra.items():
        check_relpath(rel, "extra file")
        if rel.split("/")[0] in (PLANS_DIR, WEIGHTS_DIR):
            raise ArtifactError(f"extra file {rel!r}: {PLANS_DIR}/ and {WEIGHTS_DIR}/ are written by dsv4c")
        if not isinstance(data, bytes):
            raise ArtifactError(f"extra file {rel!r}: content must be bytes, got {type(data).__name__}")
    return dict(extra)


def _check_variant(name: str, plan: Plan, tensors: Mapping[str, Any]) -> None:
    """A variant name is a plain file name and every tensor its plan reads is in the weights."""
    if not isinstance(name, str) or not _VARIANT.match(name):
        raise ArtifactError(f"variant {name!r}: names are letters, digits, '_', '.', '-'")
    if not isinstance(plan, Plan):
        raise ArtifactError(f"variant {name!r}: expected a Plan, got {type(plan).__name__}")
    missing = sorted(plan.tensor_keys - set(tensors.keys()))
    if missing:
        raise ArtifactError(f"variant {name!r}: tensors missing from the weights: {missing[:10]}")


def _write_plans(root: Path, plans: Mapping[str, Plan], files: dict[str, Any]) -> dict[str, str]:
    variants = {}
    for name, plan in plans.items():
        rel = f"{PLANS_DIR}/{name}.json"
        write_durable(root / rel, plan.to_json().encode())
        files[rel] = file_record(root / rel)
        variants[name] = rel
    return variants


def _read_manifest(root: Path) -> dict[str, Any]:
    where = f"artifact {root}: {MANIFEST}"
    try:
        manifest = json.loads((root / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{where} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: must be a JSON object")
    version = manifest.get("format_version")
    if type(version) is not int or version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{where}: field 'format_version' is {version!r}; "
                            f"this dsv4c reads {ARTIFACT_FORMAT_VERSION}")
    for name, kind in {**CALLER_FIELDS, "versions": dict, "variants": dict, "files": dict}.items():
        if not isinstance(manifest.get(name), kind):
            raise ArtifactError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    _check_file_table(manifest["files"], where)
    for name, rel in manifest["variants"].items():
        if not _VARIANT.match(name) or rel not in manifest["files"]:
            raise ArtifactError(f"{where}: variant {name!r} names {rel!r}, which is not a listed file")
    return manifest


def _check_file_table(files: dict[str, Any], where: str) -> None:
    for rel, record in files.items():
        try:
            check_relpath(rel, f"{where}: field 'files'")
        except ArtifactError as error:
            raise ArtifactError(str(error)) from None
        ok = (isinstance(record, dict) and set(record) == {"sha256", "bytes"}
              and isinstance(record["sha256"], str) and _SHA256.match(record["sha256"])
              and type(record["bytes"]) is int and record["bytes"] >= 0)
        if not ok:
            raise ArtifactError(f"{where}: field 'files' entry {rel!r} needs a sha256 (64 hex) and bytes")


def _verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every listed file present with its size and sha256, and no file that is not listed."""
    present = _regular_files(root)
    missing, extra = sorted(files.keys() - present), sorted(present - files.keys())
    if missing:
        raise ArtifactError(f"artifact {root}: files listed in {MANIFEST} are missing: {missing}")
    if extra:
        raise ArtifactError(f"artifact {root}: files not listed in {MANIFEST}: {extra}")
    for rel, record in files.items():
        _check_size(root, rel, record)
    # a Flash-size artifact is tens of GB: its files are hashed side by side (hashlib and file reads release the GIL)
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(files) or 1)) as pool:
        digests = dict(zip(files, pool.map(lambda rel: sha256_file(root / rel), files)))
    for rel, record in files.items():
        _check_sha256(root, rel, record, digests[rel])


def _verify_file(root: Path, rel: str, record: dict[str, Any]) -> None:
    """One listed file present, a regular file, with its size and sha256."""
    path = root / rel
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"artifact {root}: file {rel!r} listed in {MANIFEST} is missing or not a regular file")
    _check_size(root, rel, record)
    _check_sha256(root, rel, record, sha256_file(path))


def _check_size(root: Path, rel: str, record: dict[str, Any]) -> None:
    size = (root / rel).stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(f"artifact {root}: file {rel!r} has {size} bytes, {MANIFEST} says "
                            f"{record['bytes']} (truncated or changed)")


def _check_sha256(root: Path, rel: str, record: dict[str, Any], digest: str) -> None:
    if digest != record["sha256"]:
        raise ArtifactError(f"artifact {root}: file {rel!r} does not match its sha256 in {MANIFEST} "
                            f"(changed or corrupted); refusing to load it")


def _regular_files(root: Path) -> set[str]:
    """Relative paths of the files under `root` but the manifest; links and special files are refused."""
    found = set()
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise ArtifactError(f"artifact {root}: {rel!r} is a symbolic link; artifacts hold plain files")
            if name in names and not path.is_file():
                raise ArtifactError(f"artifact {root}: {rel!r} is not a regular file")
            if name in names and rel != MANIFEST:
                found.add(rel)
    return found


def encode_state(specs: Mapping[str, StateSpec]) -> dict[str, Any]:
    """The manifest's `state` block: per state tensor its per-sequence shape, dtype name and fill (JSON has no
    -inf, so a non-finite fill is written as its string)."""
    return {name: {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch."),
                   "fill": s.fill if math.isfinite(s.fill) else str(s.fill)} for name, s in specs.items()}


def plan_state_specs(reference: Mapping[str, StateSpec], plans: Mapping[str, Plan]) -> dict[str, StateSpec]:
    """The state the plans read: each reference state with the per-sequence shape and dtype of the plans'
    `state.<name>` inputs (a pass may store a cache packed: passes/kv_compression.py), its fill kept. Every plan
    must read a state alike, and a retyped state must start as zeros (zero bytes are a packed row of zeros)."""
    specs = dict(reference)
    for name, spec in reference.items():
        seen = {(p.shape[1:], p.dtype) for plan in plans.values() for p in plan.inputs if p.name == f"state.{name}"}
        if len(seen) > 1:
            raise ArtifactError(f"state {name!r}: the plans read it in different layouts {sorted(map(str, seen))}")
        if not seen:
            continue
        (shape, dtype), = seen
        dtype = decode_dtype(dtype, f"state {name!r}")
        if (tuple(shape), dtype) != (spec.shape, spec.dtype) and spec.fill != 0.0:
            raise ArtifactError(f"state {name!r}: stored as {dtype} {list(shape)} but starts at {spec.fill}, not zeros")
        specs[name] = StateSpec(tuple(int(d) for d in shape), dtype, spec.fill)
    return specs


def decode_state(manifest: Mapping[str, Any]) -> dict[str, StateSpec]:
    """The state specs of a manifest's `state` block (`encode_state`'s inverse); a bad entry names its field."""
    specs = {}
    for name, raw in manifest["state"].items():
        where = f"manifest field state.{name}"
        try:
            specs[name] = StateSpec(tuple(int(d) for d in raw["shape"]), decode_dtype(raw["dtype"], where),
                                    float(raw["fill"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{where}: {error}") from None
    return specs
