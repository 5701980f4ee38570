"""DeepSeek-V4 checkpoints on disk: a validated, lazy reader and writers of synthetic or given weights.

A checkpoint directory holds `config.json`, sharded `model-0000i-of-0000N.safetensors` files and
`model.safetensors.index.json` (or a single `model.safetensors`), in the released layout that
`layout.tensor_specs` describes.

`Checkpoint.open` reads the config, the index and each shard's safetensors *header* only -- never tensor
data -- and checks every tensor's presence, shape and dtype against the layout, and every shard's size
against its header. Any mismatch is a `CheckpointError` naming the file and tensor, expected and found.
Tensor data is read on demand (`get`, `tensors`) through `safetensors.safe_open`, one shard at a time.

`write_synthetic` writes seeded random weights with realistic scales in exactly that layout, atomically: into a
temporary directory next to the target, renamed into place at the end. The weights are generated on a chosen
device (the same bytes on any), in blocks of rows, by a background thread while the main thread writes the
previous blocks. `write_checkpoint` writes given weights (a trained model's, in their stored formats) the same
way, with extra files such as a tokenizer.json. Tensor bytes are written in the host's order, which must be
little-endian as safetensors requires.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
from safetensors import safe_open

from dsv4c.model.config import ConfigError, ModelConfig
from dsv4c.model.layout import FormatCount, TensorSpec, count_by_format, layer_prefix, tensor_specs
from dsv4c.model.prefetch import prefetched
from dsv4c.model.synthetic import generation_device, synthetic_pieces

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 2**30  # a layer is never split below this; Flash's largest layer is ~3.4 GiB
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_PIECES_AHEAD = 4  # generated blocks of rows waiting to be written, at most
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint on disk is not the one its config.json describes; the message names the file and tensor."""


class TensorHeader(NamedTuple):
    """What a shard's header says of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


# ---- safetensors headers -------------------------------------------------------------------------
def encode_header(specs: Iterable[TensorSpec]) -> bytes:
    """The first bytes of a safetensors file holding `specs` contiguously in this order: the little-endian
    u64 header length, then the JSON header padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": _ST_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Parse one safetensors file's header (reading no tensor data) and check the file is whole:
    every tensor's byte range matches its shape and dtype, the ranges tile the data section, and the
    file is exactly as long as the header says. Returns name -> (shape, dtype) in file order."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length {length} does not fit the file ({size} bytes)")
        raw = handle.read(length)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    entries.pop("__metadata__", None)
    parsed = {name: _parse_entry(path, name, entry) for name, entry in entries.items()}
    _check_data_section(path, size - 8 - length, parsed)
    return {name: (shape, dtype) for name, (shape, dtype, _) in parsed.items()}


def _parse_entry(path: Path, name: str, entry: Any) -> tuple[tuple[int, ...], torch.dtype, tuple[int, int]]:
    """(shape, dtype, (begin, end)) of one header entry, checked for consistency."""
    try:
        dtype_name = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name}: malformed header entry {entry!r}") from None
    if dtype_name not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name}: unsupported dtype {dtype_name!r}; "
                              f"allowed: {sorted(_ST_DTYPES)}")
    dtype = _ST_DTYPES[dtype_name]
    numel = 1
    for dim in shape:
        numel *= dim
    if min(shape, default=0) < 0 or begin < 0 or end - begin != numel * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name}: data_offsets {[begin, end]} do not hold "
                              f"{list(shape)} {dtype_name} ({numel * dtype.itemsize} bytes)")
    return shape, dtype, (begin, end)


def _check_data_section(path: Path, data_bytes: int, parsed: Mapping[str, tuple[Any, Any, tuple[int, int]]]) -> None:
    """The tensors' byte ranges must tile [0, data_bytes) exactly, as safetensors requires."""
    spans = sorted((begin, end, name) for name, (_, _, (begin, end)) in parsed.items())
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise CheckpointError(f"{path}: tensor {name}: data starts at byte {begin}, expected {expected} "
                                  "(tensor data must be contiguous, without gaps or overlaps)")
        expected = end
    if data_bytes < expected:
        raise CheckpointError(f"{path}: truncated: the header describes {expected} bytes of tensor data, "
                              f"the file holds {data_bytes}")
    if data_bytes > expected:
        raise CheckpointError(f"{path}: {data_bytes - expected} bytes after the last tensor's data")


# ---- the reader ----------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint directory, validated against the layout of its config.json; tensors load lazily.

    Attributes: `path`, `config`, `specs` (layout name -> TensorSpec), `headers` (name -> TensorHeader),
    `files` (shard file names, sorted), `opened_files` (shards whose data has been opened, in order).
    """

    def __init__(self, path: Path, config: ModelConfig, specs: Mapping[str, TensorSpec],
                 headers: Mapping[str, TensorHeader]) -> None:
        self.path = path
        self.config = config
        self.specs = MappingProxyType(dict(specs))
        self.headers = MappingProxyType(dict(headers))
        self.files = tuple(sorted({h.file for h in headers.values()}))
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "Checkpoint":
        """Read and validate a checkpoint directory's config, index and shard headers (no tensor data)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory")
        config = _read_config(root)
        headers = _read_headers(root)
        specs = tensor_specs(config)
        _check_layout(root, specs, headers)
        return cls(root, config, specs, headers)

    @property
    def opened_files(self) -> tuple[str, ...]:
        return tuple(self._handles)

    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name`, read from the one shard that holds it (opened on first use)."""
        header = self.headers.get(name)
        if header is None:
            raise KeyError(f"{name}: no such tensor in {self.path}")
        if header.file not in self._handles:
            self._handles[header.file] = safe_open(str(self.path / header.file), framework="pt")
        return self._handles[header.file].get_tensor(name)

    def tensors(self, prefix: str, strip: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor named `prefix` or under it (`prefix.` + anything; a trailing dot is optional),
        in layout order; `strip` drops `prefix.` from the returned names."""
        base = prefix.rstrip(".")
        names = [n for n in self.specs if n == base or n.startswith(base + ".")]
        return {(n[len(base) + 1:] if strip else n): self.get(n) for n in names}

    def layer_tensors(self, layer: int, strip: bool = True) -> dict[str, torch.Tensor]:
        """One layer's tensors (MTP layers follow the main ones), names relative to the layer by default."""
        return self.tensors(layer_prefix(self.config, layer), strip=strip)

    def close(self) -> None:
        """Forget the open shard handles (the files are memory-mapped; handles release on collection)."""
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_config(root: Path) -> ModelConfig:
    path = root / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (every checkpoint needs its config.json)")
    try:
        return ModelConfig.from_json(path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def _read_weight_map(root: Path) -> dict[str, str]:
    """name -> shard file, from the index or, without one, from a single model.safetensors."""
    index = root / INDEX_NAME
    if not index.is_file():
        if (root / SINGLE_NAME).is_file():
            return {name: SINGLE_NAME for name in read_header(root / SINGLE_NAME)}
        raise CheckpointError(f"{root}: neither {INDEX_NAME} nor {SINGLE_NAME} is present")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not an object")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name} maps to {file!r}; allowed: a file name in {root}")
        if not (root / file).is_file():
            raise CheckpointError(f"{index}: shard {file} (holding tensor {name}) does not exist in {root}")
    return weight_map


def _read_headers(root: Path) -> dict[str, TensorHeader]:
    """Every shard's header, checked against the index: each tensor lies in the file the index names."""
    weight_map = _read_weight_map(root)
    headers: dict[str, TensorHeader] = {}
    for file in sorted(set(weight_map.values())):
        for name, (shape, dtype) in read_header(root / file).items():
            if weight_map.get(name) != file:
                where = f"maps it to {weight_map[name]}" if name in weight_map else "does not list it"
                raise CheckpointError(f"{root / file}: holds tensor {name}, but {INDEX_NAME} {where}")
            headers[name] = TensorHeader(shape, dtype, file)
    for name, file in weight_map.items():
        if name not in headers:
            raise CheckpointError(f"{root / INDEX_NAME}: maps tensor {name} to {file}, which does not hold it")
    return headers


def _check_layout(root: Path, specs: Mapping[str, TensorSpec], headers: Mapping[str, TensorHeader]) -> None:
    """Raise one CheckpointError listing every tensor that is missing, unexpected, or misshapen."""
    problems = [f"missing tensor {name} (expected {list(spec.shape)} {spec.dtype})"
                for name, spec in specs.items() if name not in headers]
    for name, (shape, dtype, file) in headers.items():
        spec = specs.get(name)
        if spec is None:
            problems.append(f"unexpected tensor {name} in {file}")
        elif shape != spec.shape:
            problems.append(f"tensor {name} in {file}: shape {list(shape)}, expected {list(spec.shape)}")
        elif dtype != spec.dtype:
            problems.append(f"tensor {name} in {file}: dtype {dtype}, expected {spec.dtype}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{root}: {len(problems)} tensor(s) do not match the layout of its "
                              f"{CONFIG_NAME}:\n  {shown}{more}")


# ---- summary -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """What `dsv4c info` reports about a checkpoint (computed from headers only)."""

    path: str
    layer_pattern: str
    n_shards: int
    n_tensors: int
    params: int
    tensor_bytes: int
    file_bytes: int
    by_format: Mapping[str, FormatCount]

    def lines(self) -> list[str]:
        """Human-readable lines, one fact a line."""
        out = [f"checkpoint  {self.path}", f"layers      {self.layer_pattern}",
               f"shards      {self.n_shards}, tensors {self.n_tensors}",
               f"parameters  {_count(self.params)}, data {_size(self.tensor_bytes)}"]
        for fmt, count in self.by_format.items():
            out.append(f"  {fmt:<6} {count.tensors:>7} tensors {_count(count.params):>9} params "
                       f"{_size(count.bytes):>10}")
        return out


def _count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def summary(ckpt: Checkpoint) -> CheckpointSummary:
    """Parameter and byte counts by storage format, shard count and layer pattern; reads no tensor data."""
    specs = [ckpt.specs[name] for name in ckpt.headers]
    by_format = count_by_format(specs)
    return CheckpointSummary(
        path=str(ckpt.path), layer_pattern=ckpt.config.layer_pattern(), n_shards=len(ckpt.files),
        n_tensors=len(specs), params=sum(c.params for c in by_format.values()),
        tensor_bytes=sum(c.bytes for c in by_format.values()),
        file_bytes=sum((ckpt.path / f).stat().st_size for f in ckpt.files), by_format=by_format,
    )


# ---- the writer ----------------------------------------------------------------------------------
def shard_groups(specs: Iterable[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs into shards as the release does: one layer (or the embedding, or the head with the final
    norm) a shard, a group larger than `shard_bytes` cut into consecutive shards of at most that size."""
    shards: list[list[TensorSpec]] = []
    group, size = None, 0
    for spec in specs:
        key = _group_key(spec.name)
        if key != group or (size + spec.nbytes > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        group, size = key, size + spec.nbytes
    return shards


def _group_key(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("layers", "mtp"):
        return ".".join(parts[:2])
    return "embed" if name == "embed.weight" else "head"


def write_synthetic(cfg: ModelConfig, out_dir: str | os.PathLike[str], seed: int = 0,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, *, overwrite: bool = False, sparse: bool = False,
                    device: torch.device | str = "cpu", chunk_elements: int | None = None) -> Path:
    """Write a checkpoint of seeded random weights (`synthetic.synthetic_tensors`) in the released layout.

    The directory appears at `out_dir` complete or not at all: files go to a temporary sibling directory,
    renamed into place at the end and removed on any error. An existing `out_dir` is refused with
    FileExistsError unless `overwrite` is set (and then only if it holds a config.json). The weights are
    generated on `device` ("cpu", "cuda", "cuda:N"; one this torch cannot use is a ValueError) in blocks
    of about `chunk_elements` values (`synthetic.synthetic_pieces`; the files are the same bytes for any
    device and chunking), so memory stays bounded by a few blocks. `sparse` leaves all tensor data as
    holes (reading as zeros): instant at any size, for header-only tools and tests. Returns the path.
    """
    out = Path(out_dir)
    _check_shard_bytes(shard_bytes)
    device = generation_device(device)

    def fill(tmp: Path) -> None:
        if sparse:
            _write_files(cfg, tmp, shard_bytes, None)
        else:
            with prefetched(synthetic_pieces(cfg, seed, device, chunk_elements), _PIECES_AHEAD) as pieces:
                _write_files(cfg, tmp, shard_bytes, pieces)

    return _write_atomically(out, overwrite, fill)


def write_checkpoint(cfg: ModelConfig, out_dir: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     extra_files: Mapping[str, str] = MappingProxyType({}), shard_bytes: int = DEFAULT_SHARD_BYTES,
                     *, overwrite: bool = False) -> Path:
    """Write given weights as a checkpoint in the released layout (a trained model's, for example).

    `tensors` holds exactly the tensors of `tensor_specs(cfg)` in their stored form (FP8 e4m3 and MXFP4 int8
    weights with their e8m0 `.scale`, bf16, fp32, int32), each of the layout's shape and dtype; anything else is
    a CheckpointError naming the tensor. `extra_files` (file name -> text, e.g. a tokenizer.json) are written
    beside the shards. Atomic, and `overwrite` as for `write_synthetic`. Returns the path.
    """
    out = Path(out_dir)
    _check_shard_bytes(shard_bytes)
    _check_tensors(cfg, tensors)
    for name in extra_files:
        if Path(name).name != name or name in ("", ".", "..", CONFIG_NAME, INDEX_NAME) or name.endswith(".safetensors"):
            raise ValueError(f"extra_files: {name!r} is not a plain file name beside the shards")

    def fill(tmp: Path) -> None:
        _write_files(cfg, tmp, shard_bytes, ((name, tensors[name]) for name in tensor_specs(cfg)))
        for name, text in extra_files.items():
            (tmp / name).write_text(text)

    return _write_atomically(out, overwrite, fill)


def _check_shard_bytes(shard_bytes: int) -> None:
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard_bytes: got {shard_bytes!r}; allowed: a positive integer")


def _check_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming the first tensor that is missing, unexpected or misshapen."""
    specs = tensor_specs(cfg)
    for name in specs.keys() - tensors.keys():
        raise CheckpointError(f"tensor {name}: missing (expected {list(specs[name].shape)} {specs[name].dtype})")
    for name, tensor in tensors.items():
        spec = specs.get(name)
        if spec is None:
            raise CheckpointError(f"tensor {name}: not a tensor of this config's layout")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(f"tensor {name}: {list(tensor.shape)} {tensor.dtype}, expected "
                                  f"{list(spec.shape)} {spec.dtype}")


def _write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run `fill` on a temporary sibling of `out`, then rename it into place; on any error remove it."""
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: the checkpoint keeps the usual umask-derived permissions
    try:
        fill(tmp)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: already exists; remove it, or pass overwrite=True (--overwrite) to replace it")
    if out.is_symlink() or not (out / CONFIG_NAME).is_file():
        raise FileExistsError(f"{out}: exists and is not a checkpoint directory (no {CONFIG_NAME}); "
                              "refusing to replace it")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not overwrite or not out.exists():
        if out.exists():
            raise FileExistsError(f"{out}: appeared while writing; left untouched")
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_files(cfg: ModelConfig, root: Path, shard_bytes: int,
                 pieces: Iterator[tuple[str, torch.Tensor]] | None) -> None:
    """config.json, the shards (tensor data from `pieces`, or holes where it is None) and the index."""
    specs = tensor_specs(cfg)
    shards = shard_groups(specs.values(), shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    (root / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    for name, shard in zip(names, shards):
        _write_shard(root / name, shard, pieces)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())},
             "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(path: Path, specs: list[TensorSpec], pieces: Iterator[tuple[str, torch.Tensor]] | None) -> None:
    """Write one safetensors file; `pieces` yields each tensor of `specs`, in order, as (name, consecutive
    rows), or is None for holes."""
    header = encode_header(specs)
    with open(path, "wb") as handle:
        handle.write(header)
        if pieces is None:
            handle.truncate(len(header) + sum(spec.nbytes for spec in specs))
            return
        for spec in specs:
            _write_tensor(handle, spec, pieces)


def _write_tensor(handle: Any, spec: TensorSpec, pieces: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write `spec`'s data from the next pieces of `pieces`, checked to be its rows in order."""
    written = 0
    while written < spec.shape[0]:
        name, piece = next(pieces)
        if (name != spec.name or piece.dtype != spec.dtype or tuple(piece.shape[1:]) != spec.shape[1:]
                or written + piece.shape[0] > spec.shape[0]):
            raise AssertionError(f"synthesised {name} rows {list(piece.shape)} {piece.dtype} after {written} rows; "
                                 f"layout wants {spec.name} {list(spec.shape)} {spec.dtype}")
        handle.write(piece.contiguous().flatten().view(torch.uint8).numpy().data)
        written += piece.shape[0]
