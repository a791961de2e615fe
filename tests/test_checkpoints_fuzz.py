"""Fuzz cmdtool.checkpoints with mutated files of every format it reads.

Each case mutates one file of a small valid checkpoint (safetensors, zip-format torch
``.pt``, Lightning ``.ckpt``, two-shard Hugging Face folder): truncation, flipped bits and
bytes, deleted / inserted / copied ranges, and for safetensors rewritten header lengths
and re-serialised headers with altered offsets, dtypes, shapes, names and metadata. The
checkpoint is then discovered, opened and every tensor read; the outcome must be a
:class:`cmdtool.errors.CmdtoolError` or the right tensors (see ``tests/fuzz_checkpoints``
for the oracle). Hypothesis runs derandomized, so CI is reproducible; a second batch runs
in one child process under an address-space limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_checkpoints import (
    DTYPE_POOL,
    FORMATS,
    INDEX_ACTIONS,
    INTERESTING_INTS,
    METADATA_POOL,
    NAME_POOL,
    ODD_VALUES,
    SHARD_POOL,
    TARGETS,
    Fixture,
    Mutation,
    Op,
    build_fixtures,
    check_case,
)

REPO = Path(__file__).resolve().parent.parent

#: Cases per format: 4 formats x 150 take a few seconds. For a deeper, randomised hunt:
#: CMDTOOL_FUZZ_EXAMPLES=5000 CMDTOOL_FUZZ_RANDOM=1 pytest tests/test_checkpoints_fuzz.py
MAX_EXAMPLES = int(os.environ.get("CMDTOOL_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=2000,  # ms per case
    derandomize=not os.environ.get("CMDTOOL_FUZZ_RANDOM"),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- strategies

positions = st.integers(0, 1 << 16)
ints = st.sampled_from(INTERESTING_INTS) | st.integers(-64, 4096)
fix_length = st.sampled_from([True, True, True, True, False])


def _st_edit(field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    return st.tuples(
        st.just("st_edit"), positions, st.just(field), values, fix_length, st.booleans()
    )


GENERIC_OPS: list[st.SearchStrategy[Op]] = [
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("byte"), positions, st.integers(0, 255)),
    st.tuples(st.just("delete"), positions, st.integers(1, 64)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("copy"), positions, positions, st.integers(1, 128)),
]
SAFETENSORS_OPS: list[st.SearchStrategy[Op]] = [
    st.tuples(st.just("header_len"), st.just("delta"), st.integers(-16, 16)),
    st.tuples(
        st.just("header_len"),
        st.just("abs"),
        st.sampled_from((*INTERESTING_INTS, 100_000_000, 100_000_001)),
    ),
    _st_edit("dtype", st.sampled_from(DTYPE_POOL)),
    _st_edit("shape", st.lists(ints, max_size=4) | st.sampled_from(ODD_VALUES)),
    _st_edit(
        "data_offsets",
        st.tuples(st.just("rel"), st.integers(-8, 8), st.integers(-8, 8))
        | st.lists(ints, min_size=2, max_size=2)
        | st.sampled_from((*ODD_VALUES, [0], [0, 4, 8], [0, 1.5])),
    ),
    _st_edit("entry", st.sampled_from((*ODD_VALUES, {"dtype": "F32"}))),
    _st_edit("rename", st.sampled_from(NAME_POOL) | st.text(max_size=8)),
    _st_edit("delete", st.none()),
    _st_edit("metadata", st.sampled_from(METADATA_POOL)),
    _st_edit("add", st.tuples(ints, ints, ints)),
]
INDEX_OPS: list[st.SearchStrategy[Op]] = [
    st.tuples(
        st.just("index_edit"),
        positions,
        st.sampled_from(("set", "add")),
        st.sampled_from(SHARD_POOL) | st.text(max_size=12),
    ),
    st.tuples(
        st.just("index_edit"),
        positions,
        st.sampled_from(INDEX_ACTIONS),
        st.sampled_from(ODD_VALUES),
    ),
]


def ops_for(target: str) -> st.SearchStrategy[Op]:
    """The mutation ops that make sense for one file."""
    options = list(GENERIC_OPS)
    if target.endswith(".safetensors"):
        options += SAFETENSORS_OPS
    if target.endswith(".json"):
        options += INDEX_OPS
    return st.one_of(options)


@st.composite
def mutations(draw: st.DrawFn, fmt: str) -> Mutation:
    target = draw(st.sampled_from(TARGETS[fmt]))
    return Mutation(target=target, ops=draw(st.lists(ops_for(target), min_size=1, max_size=3)))


# ------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    return build_fixtures(tmp_path_factory.mktemp("fuzz-fixtures"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cases")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmutated_fixture_loads(fmt: str, fixtures: dict[str, Fixture], workdir: Path) -> None:
    outcome = check_case(fixtures[fmt], Mutation(TARGETS[fmt][0]), workdir)
    assert outcome.status == "ok", outcome.detail


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_checkpoint_reads_right_or_fails_cleanly(
    fmt: str, fixtures: dict[str, Fixture], workdir: Path, data: st.DataObject
) -> None:
    # guards: every error wrapping into CheckpointError in checkpoints.py
    mutation = data.draw(mutations(fmt), label="mutation")
    outcome = check_case(fixtures[fmt], mutation, workdir)
    assert outcome.status in ("ok", "error"), f"{outcome.status}: {outcome.detail}"


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's"
)
def test_mutated_batch_in_memory_limited_child() -> None:
    # guards: checkpoints._read_safetensors_header / _verify_zip (no allocation beyond the file)
    """200 mutations per format in one child process capped at baseline + 1.5 GiB."""
    count = 200
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz_checkpoints",
            "--count",
            str(count),
            "--seed",
            "20240611",
            "--limit-mib",
            "1536",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["limit_effective"], summary  # the cap really bit
    assert summary["escapes"] == [], json.dumps(summary["escapes"][:3], indent=1)
    assert summary["wrong"] == [], json.dumps(summary["wrong"][:3], indent=1)
    for fmt in FORMATS:
        tally = summary["cases"][fmt]
        assert sum(tally.values()) == count, (fmt, tally)
        assert set(tally) <= {"ok"} | {k for k in tally if k.startswith("error:")}, tally
        assert tally.get("ok", 0) > 0, (fmt, tally)  # some mutations are harmless
