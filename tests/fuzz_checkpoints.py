"""Mutated-checkpoint fuzzing: fixtures, mutations and the oracle.

Shared by ``tests/test_checkpoints_fuzz.py`` (hypothesis drives the mutations) and by the
memory-limited child process it starts, which runs this module as a script::

    python -m tests.fuzz_checkpoints --count 200 --seed 20240611 --limit-mib 1536

The child builds the fixtures, measures its own address space once torch is imported and
warm, caps it with ``RLIMIT_AS`` at that baseline plus ``--limit-mib``, opens ``--count``
mutated copies of each fixture (mutations drawn from a seeded numpy RNG) and prints a JSON
summary on stdout.

Oracle, for every mutated checkpoint: ``discover`` + ``open_checkpoint`` + reading every
tensor either raises a :class:`cmdtool.errors.CmdtoolError`, or returns

* for the zip-format torch and Lightning files: exactly the original tensors (the reader
  verifies the archive's CRC-32 checksums, so no corruption can go unnoticed);
* for safetensors files and Hugging Face shards, which carry no checksum: exactly the
  tensors an independent reference decoder (:func:`ref_safetensors`) reads from the
  mutated bytes; a flipped bit in tensor data is undetectable there by design. In turn,
  a single file the reference decoder accepts must be read without error.

An unmutated file must always load. Any other exception escaping is a failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from cmdtool.checkpoints import discover, open_checkpoint
from cmdtool.errors import CmdtoolError

FORMATS = ("safetensors", "torch", "lightning", "hf")
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"

#: Files of each fixture (relative to its folder) that mutations may target.
TARGETS: dict[str, tuple[str, ...]] = {
    "safetensors": ("epoch_1.safetensors",),
    "torch": ("epoch_1.pt",),
    "lightning": ("epoch=1-step=10.ckpt",),
    "hf": (f"checkpoint-10/{SHARD1}", f"checkpoint-10/{SHARD2}", f"checkpoint-10/{INDEX}"),
}

# ----------------------------------------------------------------------------- fixtures


def original_tensors() -> dict[str, torch.Tensor]:
    """The small state dict every fixture holds (float32, bf16, int64, bool, empty)."""
    return {
        "fc.weight": torch.linspace(-1.0, 1.0, 12, dtype=torch.float32).reshape(4, 3),
        "fc.bias": torch.tensor([0.5, -1.5, 2.25, 0.0], dtype=torch.float32),
        "emb.weight": torch.tensor([[1.5, -2.0], [0.125, 3.0], [7.0, -0.5]]).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "counts": torch.tensor([2**40, -3, 0, 7, 2**62], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }


@dataclass
class Fixture:
    """One valid checkpoint: its files' bytes (by path relative to the case folder)."""

    fmt: str
    files: dict[str, bytes]
    expected: dict[str, torch.Tensor]


def build_fixtures(root: Path) -> dict[str, Fixture]:
    """Write one valid checkpoint of each format under ``root`` and keep their bytes."""
    sd = original_tensors()
    fixtures: dict[str, Fixture] = {}

    folder = root / "safetensors"
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "epoch_1.safetensors"))

    folder = root / "torch"
    folder.mkdir()
    torch.save(sd, folder / "epoch_1.pt")

    folder = root / "lightning"
    folder.mkdir()
    weights = {f"model.{k}": v for k, v in sd.items()}
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": weights,
            "hyper_parameters": {
                "lr": 1e-3,
                "layers": [64, 32],
                "name": "mlp",
                "dropout": None,
                "betas": (0.9, 0.999),
                "use_bn": True,
            },
            "loops": {"fit_loop": {"epoch_progress": {"current": 1}}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
            "lr_schedulers": [],
        },
        folder / "epoch=1-step=10.ckpt",
    )

    folder = root / "hf" / "checkpoint-10"
    folder.mkdir(parents=True)
    shard1 = {k: sd[k] for k in ("fc.weight", "fc.bias")}
    shard2 = {k: v for k, v in sd.items() if k not in shard1}
    save_file(shard1, str(folder / SHARD1))
    save_file(shard2, str(folder / SHARD2))
    weight_map = {**dict.fromkeys(shard1, SHARD1), **dict.fromkeys(shard2, SHARD2)}
    index = {"metadata": {"total_size": 195}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))

    for fmt in FORMATS:
        base = root / fmt
        files = {
            p.relative_to(base).as_posix(): p.read_bytes()
            for p in sorted(base.rglob("*"))
            if p.is_file()
        }
        expected = weights if fmt == "lightning" else sd
        fixtures[fmt] = Fixture(fmt=fmt, files=files, expected=expected)
    return fixtures


# ---------------------------------------------------------------------------- mutations

#: Integers that tend to break parsers: boundaries of the usual widths, and small ones.
INTERESTING_INTS = (
    0, 1, 2, 3, 4, 7, 8, 12, 16, 48, 127, 128, 255, 256, 4096,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -1, -8, -(2**63),
)  # fmt: skip
DTYPE_POOL: tuple[Any, ...] = (
    "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F64", "C64", "U64",
    "U32", "U16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "XX", "", "f32", 4, None,
)  # fmt: skip
ODD_VALUES: tuple[Any, ...] = ("x", 3, 1.5, None, True, [], {}, [1.0], [True], [[2]], [-1])
NAME_POOL = ("", "__metadata__", "fc.bias", "counts", "x" * 300, "\ud800", "a\u00e9\u4e2d", "\x00")
METADATA_POOL: tuple[Any, ...] = (
    {"format": "pt"}, {"a": 1}, {"a": None}, "x", [], None, {"a": {"b": "c"}}, {},
)  # fmt: skip
SHARD_POOL: tuple[Any, ...] = (
    f"../{SHARD1}", f"/tmp/{SHARD1}", SHARD1, SHARD2, "missing.safetensors",
    f"sub/{SHARD1}", "", 5, None, "x" * 300 + ".safetensors", "model.bin",
    f"C:{SHARD1}", f"..\\{SHARD1}", ".", "..",
)  # fmt: skip
ST_FIELDS = ("dtype", "shape", "data_offsets", "entry", "rename", "delete", "metadata", "add")
INDEX_ACTIONS = ("set", "delete", "add", "rename", "weight_map", "drop_weight_map", "top")

Op = tuple[Any, ...]


def _is_safetensors(target: str) -> bool:
    return target.endswith(".safetensors")


def _split_header(data: bytes) -> tuple[int, dict[str, Any], bytes] | None:
    """(header length, header, rest) of safetensors-like bytes, or None if unparsable."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    return length, header, data[8 + length :]


def _edit_header(data: bytes, op: Op) -> bytes:
    """Apply an ``("st_edit", selector, field, value, fix_len, dup)`` op."""
    _, selector, fld, value, fix_len, dup = op
    split = _split_header(data)
    if split is None:
        return data
    length, header, rest = split
    names = sorted(k for k in header if k != "__metadata__")
    name = names[selector % len(names)] if names else None
    entry = header.get(name) if name is not None else None
    if fld == "metadata":
        header["__metadata__"] = value
    elif fld == "add":
        size, begin, end = value
        header["extra.added"] = {"dtype": "U8", "shape": [size], "data_offsets": [begin, end]}
    elif name is None:
        return data
    elif fld == "delete":
        del header[name]
    elif fld == "rename":
        header[value] = header.pop(name)
    elif fld == "entry":
        header[name] = value
    elif isinstance(entry, dict):
        if fld == "data_offsets" and isinstance(value, tuple) and value[:1] == ("rel",):
            old = entry.get("data_offsets")
            if isinstance(old, list) and len(old) == 2 and all(type(o) is int for o in old):
                value = [old[0] + value[1], old[1] + value[2]]
            else:
                value = [value[1], value[2]]
        entry[fld] = value
    text = json.dumps(header)
    if dup and name is not None and name in header:
        # a second copy of one entry: a JSON object with a duplicated key
        text = "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", " + text[1:]
    raw = text.encode("utf-8", "surrogatepass")
    new_length = len(raw) if fix_len else length
    return new_length.to_bytes(8, "little") + raw + rest


def _edit_index(data: bytes, op: Op) -> bytes:
    """Apply an ``("index_edit", selector, action, value)`` op to a shard index."""
    _, selector, action, value = op
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return data
    if not isinstance(index, dict):
        return data
    if action == "top":
        index = value
    elif action == "weight_map":
        index["weight_map"] = value
    elif action == "drop_weight_map":
        index.pop("weight_map", None)
    else:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return data
        names = sorted(weight_map)
        name = names[selector % len(names)]
        if action == "set":
            weight_map[name] = value
        elif action == "delete":
            del weight_map[name]
        elif action == "add":
            weight_map["extra.added"] = value
        elif action == "rename":
            weight_map[f"{name}.renamed"] = weight_map.pop(name)
    return json.dumps(index).encode("utf-8", "surrogatepass")


def apply_op(data: bytes, op: Op) -> bytes:
    """Apply one mutation op to a file's bytes."""
    kind = op[0]
    n = len(data)
    if kind == "truncate":
        return data[: op[1] % (n + 1)]
    if kind in ("flip", "byte") and n == 0:
        return data
    if kind == "flip":
        out = bytearray(data)
        out[op[1] % n] ^= 1 << (op[2] % 8)
        return bytes(out)
    if kind == "byte":
        out = bytearray(data)
        out[op[1] % n] = op[2] % 256
        return bytes(out)
    if kind == "delete":
        at = op[1] % (n + 1)
        return data[:at] + data[at + op[2] :]
    if kind == "insert":
        at = op[1] % (n + 1)
        return data[:at] + op[2] + data[at:]
    if kind == "copy":
        if n == 0:
            return data
        src, dst, length = op[1] % n, op[2] % n, op[3]
        chunk = data[src : src + length]
        chunk = chunk[: n - dst]
        return data[:dst] + chunk + data[dst + len(chunk) :]
    if kind == "header_len":
        mode, value = op[1], op[2]
        if mode == "delta" and n >= 8:
            value = int.from_bytes(data[:8], "little") + value
        return (value % 2**64).to_bytes(8, "little") + data[8:]
    if kind == "st_edit":
        return _edit_header(data, op)
    if kind == "index_edit":
        return _edit_index(data, op)
    raise ValueError(f"unknown op {op!r}")


@dataclass
class Mutation:
    """Which file of a fixture to mutate, and how."""

    target: str
    ops: list[Op] = field(default_factory=list)


def mutate(fixture: Fixture, mutation: Mutation) -> dict[str, bytes]:
    """The fixture's files with ``mutation`` applied to its target."""
    files = dict(fixture.files)
    data = files[mutation.target]
    for op in mutation.ops:
        data = apply_op(data, op)
    files[mutation.target] = data
    return files


def random_op(rng: np.random.Generator, target: str) -> Op:
    """One mutation op for ``target``, drawn from ``rng`` (the child process's source)."""

    def pick(pool: tuple[Any, ...] | list[Any]) -> Any:
        return pool[int(rng.integers(len(pool)))]

    def some_int() -> int:
        return pick(INTERESTING_INTS) if rng.random() < 0.5 else int(rng.integers(-64, 4096))

    kinds = ["truncate", "flip", "flip", "byte", "delete", "insert", "copy"]
    if _is_safetensors(target):
        kinds += ["header_len", "st_edit", "st_edit", "st_edit"]
    if target.endswith(".json"):
        kinds += ["index_edit", "index_edit"]
    kind = pick(kinds)
    pos = int(rng.integers(0, 1 << 16))
    if kind == "truncate":
        return (kind, pos)
    if kind == "flip":
        return (kind, pos, int(rng.integers(8)))
    if kind == "byte":
        return (kind, pos, pick((0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9"))))
    if kind == "delete":
        return (kind, pos, int(rng.integers(1, 64)))
    if kind == "insert":
        return (kind, pos, rng.bytes(int(rng.integers(1, 32))))
    if kind == "copy":
        return (kind, pos, int(rng.integers(0, 1 << 16)), int(rng.integers(1, 128)))
    if kind == "header_len":
        if rng.random() < 0.5:
            return (kind, "delta", int(rng.integers(-16, 17)))
        return (kind, "abs", pick((*INTERESTING_INTS, 100_000_000, 100_000_001)))
    if kind == "index_edit":
        action = pick(INDEX_ACTIONS)
        shard = pick(SHARD_POOL) if action in ("set", "add") else pick(ODD_VALUES)
        return (kind, pos, action, shard)
    fld = pick(ST_FIELDS)
    value: Any = None
    if fld == "dtype":
        value = pick(DTYPE_POOL)
    elif fld == "shape":
        if rng.random() < 0.2:
            value = pick(ODD_VALUES)
        else:
            value = [some_int() for _ in range(int(rng.integers(0, 4)))]
    elif fld == "data_offsets":
        roll = rng.random()
        if roll < 0.4:
            value = ("rel", int(rng.integers(-8, 9)), int(rng.integers(-8, 9)))
        elif roll < 0.8:
            value = [some_int(), some_int()]
        else:
            value = pick((*ODD_VALUES, [0], [0, 4, 8], [0, 1.5]))
    elif fld == "entry":
        value = pick((*ODD_VALUES, {"dtype": "F32"}, {"shape": [], "data_offsets": [0, 0]}))
    elif fld == "rename":
        value = pick(NAME_POOL)
    elif fld == "metadata":
        value = pick(METADATA_POOL)
    elif fld == "add":
        value = (some_int(), some_int(), some_int())
    return ("st_edit", pos, fld, value, bool(rng.random() < 0.85), bool(rng.random() < 0.1))


def random_mutation(rng: np.random.Generator, fixture: Fixture) -> Mutation:
    """A mutation of 1 to 3 ops of one of the fixture's target files."""
    targets = TARGETS[fixture.fmt]
    target = targets[int(rng.integers(len(targets)))]
    count = int(rng.integers(1, 4))
    return Mutation(target=target, ops=[random_op(rng, target) for _ in range(count)])


# ------------------------------------------------------------------------------ oracle

#: The reference decoder's own table: safetensors dtype code -> (torch dtype, item size).
REF_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "C64": (torch.complex64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
}

#: name -> (dtype, shape, raw little-endian bytes)
Decoded = dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def ref_safetensors(data: bytes) -> Decoded | None:
    """Decode safetensors bytes by the format's rules, or None if they break one.

    The rules: u64 header length n <= 100,000,000 and <= len - 8; the header is UTF-8
    JSON (no NaN/Infinity, no duplicate keys, no lone surrogates) holding an object;
    ``__metadata__``, if not null, maps strings to strings; every other entry has a known dtype, a
    shape of non-negative ints whose running product stays below 2**63, and
    ``data_offsets`` [begin, end] with begin <= end and end - begin == elements *
    itemsize; sorted, the spans tile the data after the header exactly.
    """
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > 100_000_000 or n > len(data) - 8:
        return None
    seen_twice: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        seen_twice.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(pairs)

    try:
        header = json.loads(
            data[8 : 8 + n].decode("utf-8"),
            object_pairs_hook=pairs_hook,
            parse_constant=_reject_constant,
        )
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        return None
    if seen_twice or not isinstance(header, dict):
        return None
    body = data[8 + n :]
    out: Decoded = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is None:  # safetensors reads null as no metadata
                continue
            if not isinstance(entry, dict) or any(not isinstance(v, str) for v in entry.values()):
                return None
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return None
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in REF_DTYPES:
            return None
        dtype, itemsize = REF_DTYPES[code]
        if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
            return None
        count = 1
        for d in shape:
            count *= d
            if count >= 2**63:
                return None
        if type(offsets) is not list or len(offsets) != 2:
            return None
        if any(type(o) is not int or o < 0 for o in offsets):
            return None
        begin, end = offsets
        if begin > end or end > len(body) or count * itemsize != end - begin:
            return None
        spans.append((begin, end))
        out[name] = (dtype, tuple(shape), body[begin:end])
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return None
        position = end
    return out if position == len(body) else None


def _plain_name(name: str) -> bool:
    if not name or name in {".", ".."} or "\x00" in name or "/" in name or "\\" in name:
        return False
    return not (PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive)


def ref_hf(files: Mapping[str, bytes]) -> Decoded | None:
    """Decode a sharded HF checkpoint folder by the index's rules, or None."""
    try:
        index = json.loads(files[f"checkpoint-10/{INDEX}"].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    for shard in weight_map.values():
        if not isinstance(shard, str) or not _plain_name(shard):
            return None
        if not shard.lower().endswith(".safetensors"):
            return None
    merged: Decoded = {}
    for shard in sorted(set(weight_map.values())):
        data = files.get(f"checkpoint-10/{shard}")
        decoded = ref_safetensors(data) if data is not None else None
        if decoded is None:
            return None
        for name, value in decoded.items():
            if name in merged or weight_map.get(name) != shard:
                return None
            merged[name] = value
    return merged if set(merged) == set(weight_map) else None


def raw(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes (native order), so NaN payloads compare exactly too."""
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


@dataclass
class Outcome:
    """How one mutated checkpoint fared."""

    status: str  # "ok", "error" (a CmdtoolError), "escape" or "wrong"
    detail: str = ""


def _compare(got: Decoded, want: Decoded) -> str:
    """'' if equal, else what differs."""
    if set(got) != set(want):
        return f"names {sorted(got)} != expected {sorted(want)}"
    for name, (dtype, shape, data) in want.items():
        if got[name] != (dtype, shape, data):
            g = got[name]
            return f"{name!r}: got {g[0]} {g[1]} {g[2][:16].hex()}, expected {dtype} {shape}"
    return ""


def decoded_of(tensors: Mapping[str, torch.Tensor]) -> Decoded:
    return {k: (v.dtype, tuple(v.shape), raw(v)) for k, v in tensors.items()}


def read_case(folder: Path) -> Decoded:
    """Discover the one checkpoint in ``folder``, open it, read and check every tensor."""
    entries = discover(folder)
    if len(entries) != 1:
        raise AssertionError(f"discover found {len(entries)} entries")
    out: Decoded = {}
    with open_checkpoint(entries[0]) as ckpt:
        for name in ckpt:
            tensor = ckpt[name]
            shape, dtype = ckpt.spec(name)
            if (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
                raise AssertionError(f"spec of {name!r} disagrees with the tensor")
            out[name] = (tensor.dtype, tuple(tensor.shape), raw(tensor))
    return out


def expected_of(fixture: Fixture, files: Mapping[str, bytes]) -> Decoded | None:
    """What reading the mutated ``files`` may return (None: it must fail)."""
    if fixture.fmt == "safetensors":
        return ref_safetensors(files[TARGETS["safetensors"][0]])
    if fixture.fmt == "hf":
        return ref_hf(files)
    return decoded_of(fixture.expected)


def check_case(fixture: Fixture, mutation: Mutation, workdir: Path) -> Outcome:
    """Write the mutated fixture to a fresh folder under ``workdir`` and judge it."""
    files = mutate(fixture, mutation)
    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        for rel, data in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        unchanged = files == fixture.files
        try:
            got = read_case(folder)
        except CmdtoolError as exc:
            if unchanged:
                return Outcome("wrong", f"the unmutated file failed: {exc}")
            want = expected_of(fixture, files)
            if fixture.fmt == "safetensors" and want is not None:
                return Outcome("wrong", f"valid per the reference decoder, yet: {exc}")
            return Outcome("error", type(exc).__name__)
        except Exception as exc:  # the failures this fuzzer hunts
            tb = "".join(traceback.format_exception(exc)[-6:])
            return Outcome("escape", f"{type(exc).__name__}: {exc}\n{tb}")
        want = expected_of(fixture, files)
        if want is None:
            return Outcome("wrong", f"loaded, but the reference says it is invalid: {sorted(got)}")
        problem = _compare(got, want)
        return Outcome("wrong", problem) if problem else Outcome("ok")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------- child process


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmSize, VmPeak, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def run_batch(
    count: int, seed: int, limit_mib: int, formats: tuple[str, ...] = FORMATS
) -> dict[str, Any]:
    """Fuzz ``count`` mutations per format under an address-space limit; a JSON summary."""
    import resource

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cmdtool-fuzz-"))
    try:
        fixtures = build_fixtures(work / "fixtures")
        for fmt in formats:  # warm up every code path before measuring the baseline
            warm = check_case(fixtures[fmt], Mutation(TARGETS[fmt][0]), work)
            if warm.status != "ok":
                raise RuntimeError(f"unmutated {fmt} fixture: {warm}")
        baseline_kib = _status_kib("VmSize")
        limit = baseline_kib * 1024 + limit_mib * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:  # the limit must really bite: more than it allows cannot be had
            probe = bytearray((limit_mib + 256) * 2**20)
            del probe
            limit_effective = False
        except MemoryError:
            limit_effective = True

        rng = np.random.default_rng(seed)
        cases: dict[str, dict[str, int]] = {}
        escapes: list[dict[str, Any]] = []
        wrong: list[dict[str, Any]] = []
        for fmt in formats:
            tally: dict[str, int] = {}
            for i in range(count):
                mutation = random_mutation(rng, fixtures[fmt])
                outcome = check_case(fixtures[fmt], mutation, work)
                key = outcome.status if outcome.status != "error" else f"error:{outcome.detail}"
                tally[key] = tally.get(key, 0) + 1
                record = {"format": fmt, "case": i, "mutation": repr(mutation)[:2000]}
                if outcome.status == "escape":
                    escapes.append({**record, "error": outcome.detail})
                elif outcome.status == "wrong":
                    wrong.append({**record, "problem": outcome.detail})
            cases[fmt] = tally
        return {
            "seed": seed,
            "count": count,
            "baseline_vmsize_kib": baseline_kib,
            "limit_bytes": limit,
            "limit_effective": limit_effective,
            "vmpeak_kib": _status_kib("VmPeak"),
            "vmsize_kib": _status_kib("VmSize"),
            "cases": cases,
            "escapes": escapes,
            "wrong": wrong,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--limit-mib", type=int, default=1536)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args(argv)
    formats = tuple(f for f in args.formats.split(",") if f)
    summary = run_batch(args.count, args.seed, args.limit_mib, formats)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__: list[str] = [
    "FORMATS",
    "TARGETS",
    "Fixture",
    "Mutation",
    "Outcome",
    "apply_op",
    "build_fixtures",
    "check_case",
    "random_mutation",
    "ref_hf",
    "ref_safetensors",
]
