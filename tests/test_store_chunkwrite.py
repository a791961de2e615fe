"""Row writes encoded by cmdtool itself (store/chunkwrite.py): the very bytes zarr writes,
and a failed or abandoned row leaves the store as it was."""

from pathlib import Path

import numpy as np
import pytest
import zarr

from cmdtool.errors import NonFiniteError, StoreError
from cmdtool.store import EpochInfo, ParamInfo, TrajectoryStore
from cmdtool.store.chunkwrite import RowWriter
from cmdtool.store.integrity import create_array
from tests.conftest import tree_digest

N, CHUNK = 2_500, 1_000  # three chunks per row, the last one an edge chunk of 500


def _store(path: Path) -> TrajectoryStore:
    return TrajectoryStore.create(path, [ParamInfo("w", (N,), "float32", 0)], chunk=CHUNK)


def _chunk_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def test_chunks_are_the_bytes_zarr_writes(tmp_path):
    rows = np.random.default_rng(3).standard_normal((2, N)).astype(np.float32)
    rows[1, 7] = -0.0  # a signed zero, kept as written
    with _store(tmp_path / "s.zarr") as st:
        writer = RowWriter(st.weights, str(st.path))
        assert writer.fast
        # row 1's edge chunk is encoded into a buffer that held one of row 0's full chunks
        st.append_epoch([(0, rows[0])], EpochInfo(0, "x"))
        st.append_epoch([(0, rows[1, :2000]), (2000, rows[1, 2000:])], EpochInfo(1, "y"))
    # the reference: zarr-python's own write of the same rows into the same layout
    ref = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ref"), mode="w")
    arr = create_array(ref, "weights", shape=(2, N), chunks=(1, CHUNK), dtype="float32")
    arr[:, :] = rows
    ours = _chunk_files(tmp_path / "s.zarr" / "weights")
    assert len(ours) == 6
    assert ours == _chunk_files(tmp_path / "ref" / "weights")
    # and plain zarr reads them back (its crc32c codec checks each chunk)
    back = zarr.open_array(tmp_path / "s.zarr" / "weights", mode="r")[:]
    assert back.tobytes() == rows.tobytes()


def test_partly_covered_chunks_go_through_zarr(tmp_path):
    # guards: RowWriter._whole (a piece not covering its chunk needs read-modify-write)
    with _store(tmp_path / "s.zarr") as st:
        row = st.begin_epoch()
        st.write_row_block(row, 0, np.ones(N, dtype=np.float32))
        st.write_row_block(row, 1200, np.full(300, 5.0, dtype=np.float32))
        want = np.ones(N, dtype=np.float32)
        want[1200:1500] = 5.0
        assert np.array_equal(st.weights[row, :], want)


def test_failed_chunk_write_drops_the_row(tmp_path):
    path = tmp_path / "s.zarr"
    with _store(path) as st:
        st.append_epoch([(0, np.ones(N, dtype=np.float32))], EpochInfo(1, "a"))
    before = tree_digest(path)
    with TrajectoryStore.open(path, mode="r+") as st:
        # a folder where row 1's second chunk goes: its write fails with an OSError
        (path / "weights" / "c" / "1" / "1" / "in the way").mkdir(parents=True)
        blocks = ((s, np.full(CHUNK, 2.0, dtype=np.float32)[: min(CHUNK, N - s)])
                  for s in range(0, N, CHUNK))
        with pytest.raises(StoreError, match="cannot write store"):
            st.append_epoch(blocks, EpochInfo(2, "b"))
        assert st.n_epochs == 1
    assert tree_digest(path) == before


def test_failure_while_a_batch_is_in_flight_leaves_nothing(tmp_path):
    # the block after the first one fails (a non-finite value found while the first is
    # being written): the first block's chunks must not land after the row is dropped
    path = tmp_path / "s.zarr"
    with _store(path) as st:
        st.append_epoch([(0, np.ones(N, dtype=np.float32))], EpochInfo(1, "a"))
    before = tree_digest(path)

    def blocks():
        yield 0, np.full(2 * CHUNK, 3.0, dtype=np.float32)
        raise NonFiniteError("epoch 2 holds NaN")

    with TrajectoryStore.open(path, mode="r+") as st:
        for _ in range(5):
            with pytest.raises(NonFiniteError):
                st.append_epoch(blocks(), EpochInfo(2, "b"))
            assert not [f for f in (path / "weights" / "c").rglob("1/*") if f.is_file()]
        assert st.n_epochs == 1
    assert tree_digest(path) == before
