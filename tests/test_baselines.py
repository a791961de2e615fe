"""cmdtool compare (issue 15): PCA, exact DMD, EMA and SWA against CMD, streamed.

Every oracle here is computed from the stored matrix read with plain zarr (numpy SVD,
PyDMD, direct numpy averages), never from cmdtool's own code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file

from cmdtool.baselines import COMPARE_ATTR, compare
from cmdtool.ingestion import ingest
from tests.conftest import REPO, n_modeled, planted, run_cli, state_dicts, tree_digest, write_run

T = 12


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmp")
    w, _, _ = planted(n_modeled(), T, 3, seed=5, noise=0.05)
    write_run(root / "run", state_dicts(w))
    ingest(root / "run", root / "s.zarr")
    return root / "s.zarr"


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    """A private copy (compare writes its result into the store)."""
    dst = tmp_path / "s.zarr"
    shutil.copytree(base_store, dst)
    return dst


def window(store: Path) -> np.ndarray:
    """The stored matrix X (N x T, float64), read with plain zarr."""
    return np.asarray(zarr.open_group(store, mode="r")["weights"][:], dtype=np.float64).T


def flat_rows(folder: Path, store: Path) -> np.ndarray:
    """Written checkpoints of one method as a matrix (N x T) in the store's column order."""
    params = sorted(
        zarr.open_group(store, mode="r").attrs["cmdtool"]["params"], key=lambda p: p["offset"]
    )
    cols = []
    for e in range(1, T + 1):
        sd = load_file(folder / f"epoch_{e}.safetensors")
        cols.append(np.concatenate([sd[p["name"]].reshape(-1).double().numpy() for p in params]))
    return np.stack(cols, axis=1)


def errors(x: np.ndarray, xhat: np.ndarray) -> tuple[float, np.ndarray]:
    per = np.linalg.norm(x - xhat, axis=0) / np.linalg.norm(x, axis=0)
    return float(np.linalg.norm(x - xhat) / np.linalg.norm(x)), per


def by_key(result) -> dict:
    return {m.key: m for m in result.methods}


def test_pca_and_dmd_equal_numpy_svd_and_pydmd(store, tmp_path):
    # guards: pca.pca_model, dmd.dmd_model, gram.GramTask and passes.ErrorTask/BasisTask
    from pydmd import DMD

    ranks = (1, 2, 5)
    got = by_key(compare(store, methods="pca,dmd", ranks=ranks, write=tmp_path / "out"))
    x = window(store)
    mean = x.mean(axis=1, keepdims=True)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    for d in ranks:
        rel, per = errors(x, mean + (u[:, :d] * s[:d]) @ vt[:d])
        m = got[f"pca-{d}"]
        assert m.relative_error == pytest.approx(rel, rel=1e-6)
        np.testing.assert_allclose(m.epoch_errors, per, rtol=1e-6)
        assert m.stored_values == x.shape[0] * d + d * T + x.shape[0]
    for r in ranks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = DMD(svd_rank=r, exact=True).fit(x).reconstructed_data
        assert np.abs(want.imag).max() < 1e-6 * np.abs(want).max()
        want = want.real
        rel, per = errors(x, want)
        m = got[f"dmd-{r}"]
        assert m.relative_error == pytest.approx(rel, rel=1e-4)
        np.testing.assert_allclose(m.epoch_errors, per, rtol=1e-4)
        rebuilt = flat_rows(tmp_path / "out" / f"dmd-{r}", store)
        assert np.linalg.norm(rebuilt - want) <= 1e-4 * np.linalg.norm(want)
        assert m.stored_values == x.shape[0] * r + 2 * r
    rebuilt = flat_rows(tmp_path / "out" / "pca-2", store)
    want = mean + (u[:, :2] * s[:2]) @ vt[:2]
    assert np.abs(rebuilt - want).max() <= 1e-6 * np.abs(want).max()


def test_ema_and_swa_equal_numpy_averages(store, tmp_path):
    # guards: averages.ema_matrix/swa_matrix (errors) and rebuild._ema_rows/_swa_rows
    beta, k = 0.7, 3
    got = by_key(
        compare(store, methods=["ema", "swa"], ema_decay=beta, swa_epochs=k, write=tmp_path / "o")
    )
    x = window(store)
    ema = np.empty_like(x)
    ema[:, 0] = x[:, 0]
    for t in range(1, T):
        ema[:, t] = beta * ema[:, t - 1] + (1 - beta) * x[:, t]
    swa = np.stack([x[:, max(0, t - k + 1) : t + 1].mean(axis=1) for t in range(T)], axis=1)
    for key, want in (("ema", ema), ("swa", swa)):
        rel, per = errors(x, want)
        assert got[key].relative_error == pytest.approx(rel, rel=1e-9)
        np.testing.assert_allclose(got[key].epoch_errors, per, rtol=1e-9, atol=1e-15)
        rebuilt = flat_rows(tmp_path / "o" / key, store)
        np.testing.assert_allclose(rebuilt, want.astype(np.float32), rtol=0, atol=1e-6)
        assert got[key].stored_values == x.shape[0] * T
    assert got["ema"].epoch_errors[0] == 0.0  # e_0 = w_0


def test_cli_json_cmd_entry_and_stored_attribute(store):
    # fits CMD with defaults (the store has none), prints JSON, stores it on the group
    r = run_cli("compare", store, "--methods", "cmd,pca", "--ranks", "3", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(m["method"], m["rank"]) for m in data["methods"]] == [("cmd", None), ("pca", 3)]
    for m in data["methods"]:
        assert set(m) >= {"relative_error", "epoch_errors", "stored_values", "seconds", "metric"}
        assert m["metric"] is None and len(m["epoch_errors"]) == T
    g = zarr.open_group(store, mode="r")
    assert g["cmd"].attrs[COMPARE_ATTR]["methods"] == data["methods"]
    # CMD's error from its stored arrays, by numpy: w_hat = a * w[:, ref] + b
    x = window(store)
    lab = np.asarray(g["cmd/labels"][:])
    a = np.asarray(g["cmd/a"][:], dtype=np.float64)
    b = np.asarray(g["cmd/b"][:], dtype=np.float64)
    ref = np.asarray(g["cmd/ref_index"][:])
    rel, per = errors(x, a[:, None] * x[ref[lab]] + b[:, None])
    cmd = data["methods"][0]
    assert cmd["relative_error"] == pytest.approx(rel, rel=1e-6)
    np.testing.assert_allclose(cmd["epoch_errors"], per, rtol=1e-6)
    m = g["cmd"].attrs["cmdtool_result"]["n_modes"]
    assert cmd["stored_values"] == 2 * x.shape[0] + m * T


def _checksum(state) -> dict[str, float]:
    return {"sum": float(sum(v.double().sum() for k, v in state.items() if v.is_floating_point()))}


def test_eval_metric_per_method_and_report_section(store, tmp_path):
    # guards: the metric per rebuilt checkpoint and report/compare.py's section
    from cmdtool.report import write_report

    res = compare(store, methods="cmd,swa,pca", ranks=[2], swa_epochs=2, eval=_checksum)
    x = window(store)
    assert res.metrics == ["sum"]
    assert res.raw_metric["sum"]["values"] == pytest.approx(list(x.sum(axis=0)), rel=1e-5)
    swa = np.stack([x[:, max(0, t - 1) : t + 1].mean(axis=1) for t in range(T)], axis=1)
    want = swa.sum(axis=0)
    m = by_key(res)["swa"].metric["sum"]
    assert m["values"] == pytest.approx(list(want), rel=1e-5)
    assert m["last_mean"] == pytest.approx(want[-10:].mean(), rel=1e-5)
    assert m["last_spread"] == pytest.approx(want[-10:].std(), rel=1e-4)
    summary = write_report(store, tmp_path / "rep")
    html = Path(summary.html).read_text()
    assert "<h2>Compared with</h2>" in html
    assert "Compared with: sum per method" in html
    assert f"{by_key(res)['pca-2'].relative_error:.5f}" in html  # the table's row
    assert (tmp_path / "rep" / "compare_errors.png").stat().st_size > 1000
    stored = json.loads((tmp_path / "rep" / "report.json").read_text())["compare"]
    assert [e["method"] for e in stored["methods"]] == ["cmd", "swa", "pca"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--methods", "cmd,svd"], ["'svd'", "pca"]),
        (["--ranks", "0"], ["--ranks 0", ">= 1"]),
        (["--ranks", "2,12"], ["--ranks 12", f"{T} epochs"]),
        (["--ema-decay", "1"], ["--ema-decay 1", "< 1"]),
        (["--swa-epochs", "0"], ["--swa-epochs 0", ">= 1"]),
        (["--swa-epochs", "13"], ["--swa-epochs 13", f"{T} epochs"]),
        (["--epochs", "1:3"], ["2 epoch(s)", "at least 3"]),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(base_store, tmp_path, args, needles):
    before = tree_digest(base_store)
    r = run_cli("compare", base_store, *args, "--write", tmp_path / "o")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert tree_digest(base_store) == before
    assert not (tmp_path / "o").exists()


N_BIG, T_BIG = 1_000_000, 24  # 96 MB of float32 trajectory
HEADROOM_MB = 64  # what the child may allocate beyond its warmed-up size

CHILD = """
import json, resource, sys
from pathlib import Path
from cmdtool.baselines import compare

big, small = sys.argv[1], sys.argv[2]
compare(small, methods="pca,dmd,ema,swa", ranks=[2])  # warm up: imports, zarr's event loop

def vm_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

limit = vm_kb("VmSize") * 1024 + int(sys.argv[3]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    bytearray(int(sys.argv[4]))  # the whole trajectory would not fit: the limit bites
    bites = False
except MemoryError:
    bites = True
res = compare(big, methods="pca,dmd,ema,swa", ranks=[1, 5])
print(json.dumps({"bites": bites, "errors": {m.key: m.relative_error for m in res.methods}}))
"""


def test_compare_stays_out_of_core(tmp_path):
    # guards: the column-block streaming of gram.GramTask and passes.ErrorTask
    from tests.test_memory import _planted_store

    _planted_store(tmp_path / "big.zarr", N_BIG, T_BIG)
    _planted_store(tmp_path / "small.zarr", 5000, 6, seed=1)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big.zarr"), str(tmp_path / "small.zarr"),
         str(HEADROOM_MB), str(N_BIG * T_BIG * 4)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bites"]
    # 5 planted profiles: PCA with 5 components is exact up to float32 rounding
    assert result["errors"]["pca-5"] < 1e-5 < result["errors"]["pca-1"]
    assert set(result["errors"]) == {"pca-1", "pca-5", "dmd-1", "dmd-5", "ema", "swa"}
