"""Readers see one decomposition (issue 11, item 4): a reader never mixes two published
versions of a results group, however a writer republishes it meanwhile.

Two clearly different decompositions of one small planted store (A: 2 modes, seed 0; B: 5
modes, seed 1), copied aside once. Writers republish them alternately through the real
publishing code (``begin_result`` + the version's files + ``publish_result``); readers
(``reconstruct``, ``report``, ``info``, ``evaluate``, ``CMD.load``) run meanwhile, and
every output is compared with what A and B give, computed here with numpy and plain zarr
from the copies (``w_hat = a * weights[t, ref_index][labels] + b``, the README's rule).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import load_file

import cmdtool.store.trajectory
from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from cmdtool.store import TrajectoryStore
from tests.conftest import REPO, n_modeled, planted, run_cli, state_dicts, write_run

CHUNK = 1024  # 4 chunks of N = 3224: one read of labels, a or b is 4 file reads
T = 8


class Version:
    """A decomposition copied out of the store, and what it rebuilds, by plain zarr."""

    def __init__(self, folder: Path, weights: np.ndarray) -> None:
        g = zarr.open_group(folder, mode="r")
        self.folder = folder
        self.labels = np.asarray(g["labels"][:], dtype=np.int64)
        self.a = np.asarray(g["a"][:], dtype=np.float64)
        self.b = np.asarray(g["b"][:], dtype=np.float64)
        self.ref_index = np.asarray(g["ref_index"][:], dtype=np.int64)
        self.attrs = dict(g.attrs["cmdtool_result"])  # type: ignore[arg-type]
        ref = weights[:, self.ref_index].astype(np.float64)  # (T, M)
        #: (T, N) float32: every epoch rebuilt by the README's rule
        self.rebuilt = (self.a * ref[:, self.labels] + self.b).astype(np.float32)
        self.n_modes = int(self.ref_index.size)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("versions")
    w, _, _ = planted(n_modeled(), T, 3, seed=5)
    write_run(root / "run", state_dicts(w))
    store = root / "s.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
        # no normalization statistics: their --stats treatment (issue 12) is not a*r+b
        ingest(root / "run", store, exclude=r"running_")
    weights = np.asarray(zarr.open_array(store / "weights", mode="r")[:])
    versions = {}
    for key, est in (("A", CMD(2, n_samples=200, seed=0)), ("B", CMD(5, n_samples=300, seed=1))):
        est.fit(store)
        shutil.copytree(store / "cmd", root / key)
        versions[key] = Version(root / key, weights)
    a, b = versions["A"], versions["B"]
    assert (a.n_modes, b.n_modes) == (2, 5)
    for start in range(0, n_modeled(), CHUNK):  # a mix of the two is visible in every chunk
        cols = slice(start, start + CHUNK)
        assert not np.array_equal(a.labels[cols], b.labels[cols])
        assert np.all(np.any(a.rebuilt[:, cols] != b.rebuilt[:, cols], axis=1))
    params = list(zarr.open_group(store, mode="r").attrs["cmdtool"]["params"])  # type: ignore[index]
    return {"store": store, "versions": versions, "params": params, "weights": weights}


@pytest.fixture
def store(base: dict, tmp_path: Path) -> Path:
    """A copy of the store, holding version B as ``cmd``."""
    dst = tmp_path / "s.zarr"
    shutil.copytree(base["store"], dst)
    return dst


def republish(st: TrajectoryStore, version: Version, name: str = "cmd") -> None:
    """What ``decompose`` does, with the version's files instead of a new fit."""
    partial = st.begin_result(name)
    shutil.copytree(version.folder, st.path / partial.path, dirs_exist_ok=True)
    st.publish_result(name)


def flat_of(path: Path, params: list[dict]) -> np.ndarray:
    """The modeled values of a checkpoint file, float32 (N,) in store column order."""
    tensors = load_file(str(path))
    order = sorted(params, key=lambda p: p["offset"])
    return np.concatenate([tensors[p["name"]].astype(np.float32).ravel() for p in order])


def which(flat: np.ndarray, row: int, versions: dict[str, Version]) -> str:
    for key, v in versions.items():
        if np.array_equal(flat, v.rebuilt[row]):
            return key
    return "mixed"


def run_outputs(out: Path, labels: list[int], base: dict) -> set[str]:
    """Which version each file of one reconstruct run comes from ({"A"}, {"B"}, or more)."""
    params, versions = base["params"], base["versions"]
    return {
        which(flat_of(out / f"epoch_{label}.safetensors", params), label - 1, versions)
        for label in labels
    }


# -------------------------------------------------------------------- the stress test
def flat_of_state(state: dict, params: list[dict]) -> np.ndarray:
    order = sorted(params, key=lambda p: p["offset"])
    return np.concatenate([state[p["name"]].numpy().astype(np.float32).ravel() for p in order])


def test_readers_never_mix_versions_under_alternating_republishes(base, store, tmp_path):
    """200 reader runs against a writer republishing A and B in turn (on average once per
    three reader runs, at random instants): every output is exactly A's or exactly B's.

    Readers, in two threads: ``CMD.load`` + ``rebuild_state`` of one epoch (what
    ``reconstruct`` does per file), a whole ``reconstruct`` of two epochs (both files from
    one version), and ``describe`` (``info``).
    """
    from cmdtool.reconstruction import rebuild_state
    from cmdtool.store.describe import describe

    versions, params = base["versions"], base["params"]
    stop = threading.Event()
    published = [0]
    durations = [0.05]  # running mean of a reader run, seconds
    errors: list[str] = []
    runs: dict[str, int] = {"A": 0, "B": 0, "mixed": 0, "failed": 0, "info": 0}

    def writer() -> None:
        rng = random.Random(0)
        with TrajectoryStore.open(store, mode="r+") as st:
            while not stop.is_set():
                republish(st, versions["A" if published[0] % 2 == 0 else "B"])
                published[0] += 1
                time.sleep(rng.uniform(0.0, 6.0) * durations[0])

    def reader(k: int, n_runs: int) -> None:
        st = TrajectoryStore.open(store)
        for j in range(n_runs):
            t0 = time.perf_counter()
            try:
                if j % 10 == 4:  # info: the settings of one version
                    (d,) = describe(store)["decompositions"]
                    assert (d["n_modes"], d["mode_sizes"]) in [
                        (v.attrs["n_modes"], v.attrs["mode_sizes"]) for v in versions.values()
                    ]
                    runs["info"] += 1
                    continue
                if j % 10 == 9:  # reconstruct: both files from one version
                    out = tmp_path / f"out-{k}-{j}"
                    reconstruct(store, out, epochs=f"2,{T}")
                    got = {
                        which(flat_of(out / f"epoch_{lab}.safetensors", params), lab - 1, versions)
                        for lab in (2, T)
                    }
                    shutil.rmtree(out)
                else:  # the library: load, rebuild; again if it was republished meanwhile
                    label = 1 + j % T
                    for attempt in range(8):
                        try:
                            state = rebuild_state(CMD.load(st), label)
                            break
                        except StoreError as exc:  # ResultChangedError: load it again
                            if "republished" not in str(exc) or attempt == 7:
                                raise
                    got = {which(flat_of_state(state, params), label - 1, versions)}
            except StoreError as exc:  # republished READ_ATTEMPTS times in a row: no output
                runs["failed"] += 1
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # today's code dies with IndexError
                runs["mixed"] += 1
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                durations[0] = 0.9 * durations[0] + 0.1 * (time.perf_counter() - t0)
            runs[got.pop() if len(got) == 1 and "mixed" not in got else "mixed"] += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    w = threading.Thread(target=writer)
    w.start()
    try:
        readers = [threading.Thread(target=reader, args=(k, 100)) for k in range(2)]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
    finally:
        stop.set()
        w.join()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    print(f"runs {runs}, {published[0]} republishes, {seconds:.1f} s ({cpu:.1f} s CPU)", errors[:3])
    assert runs["mixed"] == 0, (runs, errors[:3])
    assert sum(runs.values()) == 200
    assert runs["failed"] <= 2, (runs, errors[:3])
    # the race really ran: both versions were read, and the writer switched often
    assert runs["A"] > 10 and runs["B"] > 10, runs
    assert published[0] >= 20, published


# ------------------------------------------------------- publishing and pinning, one by one
def generation_of(folder: Path) -> object:
    """The group's ``cmdtool_generation``, read as plain JSON."""
    return json.loads((folder / "zarr.json").read_text())["attributes"].get("cmdtool_generation")


def test_each_publish_has_a_new_generation_and_plain_zarr_reads_the_current_one(base, store):
    a = base["versions"]["A"]
    seen = {generation_of(a.folder)}  # the copy carries the token of its own publish
    with TrajectoryStore.open(store, mode="r+") as st:
        for _ in range(3):
            republish(st, a)
            token = generation_of(store / "cmd")
            assert isinstance(token, str) and len(token) == 32 and token not in seen
            seen.add(token)
    assert np.array_equal(zarr.open_group(store / "cmd", mode="r")["labels"][:], a.labels)
    hidden = [p.name for p in store.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert hidden == []  # no .partial-*, .trash-* left behind


def test_a_loaded_model_refuses_a_replaced_version(base, store):
    from cmdtool.errors import ResultChangedError

    a, b = base["versions"]["A"], base["versions"]["B"]
    model = CMD.load(store)
    assert np.array_equal(model.labels_, b.labels)
    with TrajectoryStore.open(store, mode="r+") as st:
        republish(st, a)
    with pytest.raises(ResultChangedError, match=r"'cmd' .* republished after it was loaded"):
        _ = model.a_
    assert ResultChangedError.exit_code == 6
    again = CMD.load(store)
    assert again.n_modes_ == 2 and np.array_equal(again.a_, a.a.astype(np.float32))


def test_the_old_version_restored_after_a_kill_gets_a_new_generation(base, store):
    b = base["versions"]["B"]
    with TrajectoryStore.open(store) as st:
        pin, _ = st.pin_result("cmd")
        (store / "cmd").rename(store / ".partial-cmd.old")  # a writer killed between renames
        old_pin, _ = st.pin_result("cmd")  # readers still find it
        assert old_pin.folder == ".partial-cmd.old"
        assert old_pin.generation == pin.generation and old_pin.is_current()
        TrajectoryStore.open(store, mode="r+").close()  # the next writer restores it
        # whoever pinned it, at either path, sees that it is not the version they read
        assert not pin.is_current() and not old_pin.is_current()
        new_pin, group = st.pin_result("cmd")
    assert new_pin.folder == "cmd" and new_pin.generation not in (None, pin.generation)
    assert np.array_equal(group["labels"][:], b.labels)


def test_a_worker_refuses_a_version_other_than_the_one_the_client_pinned(base, store, tmp_path):
    """What a Dask worker gets: a pickled EpochWriter that loads the decomposition by name."""
    import pickle

    from cmdtool.errors import ResultChangedError
    from cmdtool.reconstruction import EpochWriter

    out = tmp_path / "out"
    out.mkdir()
    model = CMD.load(store)  # the client pins B
    writer = EpochWriter(str(store), "cmd", str(out), "safetensors", model.pin_.generation)
    shipped = pickle.dumps(writer)
    with TrajectoryStore.open(store, mode="r+") as st:
        republish(st, base["versions"]["A"])  # before the worker loads it
    with pytest.raises(ResultChangedError, match=r"'cmd' .* republished since the run started"):
        pickle.loads(shipped)(T)
    assert list(out.iterdir()) == []
    # pinned to the version now published, the worker writes A's epoch
    now = CMD.load(store).pin_.generation
    pinned = EpochWriter(str(store), "cmd", str(out), "safetensors", now)
    path = Path(pickle.loads(pickle.dumps(pinned))(T))
    assert which(flat_of(path, base["params"]), T - 1, base["versions"]) == "A"


def test_info_lists_a_decomposition_while_it_is_being_republished(base, store):
    from cmdtool.store.describe import describe

    (store / "cmd").rename(store / ".partial-cmd.old")  # between the two renames of publish
    (d,) = describe(store)["decompositions"]
    assert (d["name"], d["n_modes"]) == ("cmd", 5)


def relative_error(v: Version, weights: np.ndarray) -> float:
    w = weights.astype(np.float64)
    return float(np.sqrt(((w - v.rebuilt) ** 2).sum() / (w**2).sum()))


def test_report_numbers_come_from_one_version_when_republished_mid_pass(base, store):
    from cmdtool.report import compute

    a, b = base["versions"]["A"], base["versions"]["B"]
    st = TrajectoryStore.open(store)
    read_block = st.read_block
    calls = [0]

    def read_block_then_republish(*args, **kwargs):  # a writer strikes after one block
        calls[0] += 1
        if calls[0] == 2:
            with TrajectoryStore.open(store, mode="r+") as writer:
                republish(writer, a)
        return read_block(*args, **kwargs)

    st.read_block = read_block_then_republish  # type: ignore[method-assign]
    summary = compute(st).summary
    want = relative_error(a, base["weights"])
    assert summary["relative_error"]["overall"] == pytest.approx(want, rel=1e-6)
    assert summary["n_modes"] == 2 and summary["settings"]["mode_sizes"] == a.attrs["mode_sizes"]
    assert summary["mode_sizes"] == np.bincount(a.labels, minlength=2).tolist()
    assert calls[0] > 4  # the pass was interrupted and ran again
    assert relative_error(b, base["weights"]) != pytest.approx(want, rel=1e-3)


def test_evaluate_stores_its_result_on_the_version_it_evaluated(base, store):
    from cmdtool.evaluation import evaluate

    a, b = base["versions"]["A"], base["versions"]["B"]
    params = base["params"]
    calls = [0]

    def fn(state):
        calls[0] += 1
        if calls[0] == 2:  # CMD's checkpoint of B is evaluated; then A replaces B
            with TrajectoryStore.open(store, mode="r+") as writer:
                republish(writer, a)
        return {"total": float(flat_of_state(state, params).astype(np.float64).sum())}

    result = evaluate(store, fn, epochs=str(T))
    stored = zarr.open_group(store / "cmd", mode="r").attrs["cmdtool_evaluation"]
    want = float(a.rebuilt[T - 1].astype(np.float64).sum())
    assert stored["cmd"]["total"] == [pytest.approx(want, rel=1e-12)]  # type: ignore[index]
    assert result.cmd["total"] == [pytest.approx(want, rel=1e-12)]
    assert calls[0] == 4  # evaluated again, on A
    assert float(b.rebuilt[T - 1].astype(np.float64).sum()) != pytest.approx(want, rel=1e-6)


def test_a_reader_gives_up_after_too_many_republishes(base, store, monkeypatch):
    import cmdtool.store.results

    monkeypatch.setattr(cmdtool.store.results, "RETRY_PAUSE_S", 0.0)
    versions = base["versions"]
    before = sorted(p.name for p in store.iterdir())
    st = TrajectoryStore.open(store)
    count = [0]

    def read(pin, group):
        with TrajectoryStore.open(store, mode="r+") as writer:  # republished every time
            republish(writer, versions["AB"[count[0] % 2]])
        count[0] += 1
        return group["labels"][:]

    with pytest.raises(StoreError, match=r"decomposition 'cmd' of store .* republished 8 times"):
        st.read_result("cmd", read)
    assert count[0] == 8
    assert sorted(p.name for p in store.iterdir()) == before


# ------------------------------------------------------------- the Why, through the CLI
WRITER = """
import sys, time
from pathlib import Path
import cmdtool.store.results as results
from cmdtool.decomposition import CMD

out = Path(sys.argv[2])
publish = results.ResultGroups.publish_result

def publish_once_the_reader_wrote_a_file(self, name):
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while not any(out.glob("epoch_*.safetensors")):
        if time.monotonic() > deadline:
            sys.exit("no reader came")
        time.sleep(0.001)
    got = publish(self, name)
    print("published", time.time(), flush=True)
    return got

results.ResultGroups.publish_result = publish_once_the_reader_wrote_a_file
CMD(5, n_samples=300, seed=1).fit(sys.argv[1])
"""


def test_cli_reconstruct_while_decompose_republishes_writes_one_version(base, store, tmp_path):
    """``cmdtool reconstruct --epochs all`` while ``decompose`` publishes a new version
    after the first file is written: every file comes from the new version (the run
    started again), none from the old, no mix within a file, exit 0."""
    a = base["versions"]["A"]
    with TrajectoryStore.open(store, mode="r+") as st:
        republish(st, a)  # the old version: A
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        # the console script's main(), a process forked from the session's fork server
        r = run_cli("reconstruct", store, out, "--epochs", "all", timeout=300)
        ended = time.time()
        tail = writer.communicate(timeout=300)[0]
    finally:
        writer.kill()
    assert writer.returncode == 0, tail
    published = float(tail.split()[-1])
    assert published < ended  # the new version appeared while reconstruct ran
    assert r.returncode == 0, r.stderr
    assert f"wrote {T} checkpoint(s)" in r.stdout
    new = Version(store / "cmd", base["weights"])
    assert new.n_modes == 5
    got = [
        which(flat_of(out / f"epoch_{t}.safetensors", base["params"]), t - 1, {"A": a, "new": new})
        for t in range(1, T + 1)
    ]
    assert got == ["new"] * T
