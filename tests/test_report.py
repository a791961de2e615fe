"""``cmdtool report`` end to end on real stores: figures, report.json against numbers
computed here from the full W with plain zarr, folder rules, ``run`` writing it."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import zarr

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.pipeline import run_all
from cmdtool.report import SCHEMA, validate, write_report
from tests.conftest import REPO, n_modeled, planted, state_dicts, write_run
from tests.test_cli import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = [
    "correlation.png",
    "references.png",
    "members.png",
    "bands.png",
    "tensor_modes.png",
    "errors.png",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A planted 20-epoch store with a 3-mode decomposition 'cmd'."""
    tmp = tmp_path_factory.mktemp("report")
    w, _, _ = planted(n_modeled(), 20, 4, seed=7, noise=0.02)
    write_run(tmp / "run", state_dicts(w))
    store = tmp / "s.zarr"
    ingest(tmp / "run", store)
    CMD(3, n_samples=300).fit(store)
    return store


def _embedded_pngs(html: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


def _check_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] >= 100 and img.shape[1] >= 100


def _expected(store: Path):
    """Per-tensor shares and relative errors from the full W, read with plain zarr."""
    root = zarr.open_group(store, mode="r")
    g = root["cmd"]
    w = np.asarray(root["weights"][:], dtype=np.float64)  # (T, N): the store is small
    labels = np.asarray(g["labels"][:], dtype=np.int64)
    a = np.asarray(g["a"][:], dtype=np.float64)
    b = np.asarray(g["b"][:], dtype=np.float64)
    ref = w[:, np.asarray(g["ref_index"][:])]  # (T, M)
    w_hat = a * ref[:, labels] + b
    e2, s2 = (w - w_hat) ** 2, w**2
    m = len(g["ref_index"][:])
    params = sorted(root.attrs["cmdtool"]["params"], key=lambda p: p["offset"])
    shares, tensor_err = [], []
    for p in params:
        sl = slice(p["offset"], p["offset"] + int(np.prod(p["shape"])))
        shares.append(np.bincount(labels[sl], minlength=m) / (sl.stop - sl.start))
        tensor_err.append(np.sqrt(e2[:, sl].sum() / s2[:, sl].sum()))
    epoch_err = np.sqrt(e2.sum(axis=1) / s2.sum(axis=1))
    overall = np.sqrt(e2.sum() / s2.sum())
    return params, np.array(shares), np.array(tensor_err), epoch_err, overall, w.shape, m


def test_report_figures_json_and_numbers(fitted, tmp_path):
    out = tmp_path / "rep"
    r = cli("report", fitted, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "CMD 'cmd'" in r.stdout and "report.html" in r.stdout
    html = (out / "report.html").read_text()
    pngs = _embedded_pngs(html)
    assert len(pngs) == len(FIGURES)
    assert 'src="file:' not in html and "http" not in html.split("<body>")[1]
    for data in pngs:
        _check_png(data)
    for name in FIGURES:
        _check_png((out / name).read_bytes())
    assert not (out / "evaluation.png").exists()

    rep = json.loads((out / "report.json").read_text())
    assert validate(rep) == []
    assert validate({"n_params": "x"}) != []  # the check does reject
    assert "evaluation" not in rep and "sweep" not in rep
    params, shares, tensor_err, epoch_err, overall, (t, n), m = _expected(fitted)
    assert rep["settings"] == dict(zarr.open_group(fitted / "cmd").attrs["cmdtool_result"])
    assert [x["name"] for x in rep["tensors"]] == [p["name"] for p in params]
    np.testing.assert_allclose([x["mode_shares"] for x in rep["tensors"]], shares, rtol=1e-12)
    assert sum(rep["mode_sizes"]) == n
    np.testing.assert_allclose([x["relative_error"] for x in rep["tensors"]], tensor_err, 1e-5)
    np.testing.assert_allclose(rep["relative_error"]["per_epoch"], epoch_err, rtol=1e-5)
    np.testing.assert_allclose(rep["relative_error"]["overall"], overall, rtol=1e-5)
    assert rep["compression"]["ratio"] == pytest.approx(n * t / (2 * n + m * t))
    # the window here is every epoch: the fit's own figure agrees
    assert rep["relative_error"]["window"] == pytest.approx(
        rep["settings"]["relative_error"], rel=1e-3
    )

    # an existing report is kept without --force, replaced with it
    before = (out / "report.json").stat().st_mtime_ns
    r = cli("report", fitted, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--force" in r.stderr
    # the forced report is the new one: made from a copy whose decomposition changed since
    changed = tmp_path / "changed.zarr"
    shutil.copytree(fitted, changed)
    CMD(2, n_samples=200).fit(changed)
    r = cli("report", changed, "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    fresh = json.loads((out / "report.json").read_text())
    assert rep["n_modes"] == 3 and fresh["n_modes"] == 2 and validate(fresh) == []
    assert fresh["settings"] == dict(zarr.open_group(changed / "cmd").attrs["cmdtool_result"])
    assert str(changed) in (out / "report.html").read_text()
    assert len(_embedded_pngs((out / "report.html").read_text())) == len(FIGURES)
    # a file the report did not write is never deleted: --force refuses (issue 11)
    (out / "stale.txt").write_text("old")
    r = cli("report", fitted, "--out", out, "--force")
    assert r.returncode == 2 and "'stale.txt'" in r.stderr, r.stderr
    assert (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    r = cli("report", fitted, "--out", out, "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["html"] == str(out / "report.html")
    assert (out / "report.json").stat().st_mtime_ns >= before


def test_evaluation_and_sweep_attributes_are_reported(fitted, tmp_path):
    g = zarr.open_group(fitted / "cmd", mode="r+")
    evaluation = {
        "epochs": [5, 10, 15, 20],
        "metrics": ["accuracy"],
        "raw": {"accuracy": [0.5, 0.6, 0.7, 0.72]},
        "cmd": {"accuracy": [0.52, None, 0.71, 0.74]},  # null: a NaN metric
    }
    sweep = {"modes": [1, 2, 3], "relative_error": [0.3, 0.2, 0.1], "metrics": {}}
    g.attrs["cmdtool_evaluation"] = evaluation
    g.attrs["cmdtool_sweep"] = sweep
    try:
        out = tmp_path / "rep"
        r = cli("report", fitted, "--out", out)
        assert r.returncode == 0, r.stderr
        assert len(_embedded_pngs((out / "report.html").read_text())) == len(FIGURES) + 2
        _check_png((out / "evaluation.png").read_bytes())
        _check_png((out / "sweep.png").read_bytes())
        rep = json.loads((out / "report.json").read_text())
        assert rep["evaluation"] == evaluation and rep["sweep"] == sweep
        assert validate(rep) == []
    finally:
        del g.attrs["cmdtool_evaluation"]
        del g.attrs["cmdtool_sweep"]


def test_no_decomposition_and_default_folder(fitted, tmp_path):
    r = cli("report", fitted, "--name", "nope")
    assert r.returncode == 3 and "decompose" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (fitted.parent / "report").exists()
    copy = tmp_path / "c.zarr"
    shutil.copytree(fitted, copy)
    summary = write_report(copy)  # the library call, default folder
    assert summary.out == str(tmp_path / "report")
    assert (tmp_path / "report" / "report.html").is_file()


def test_run_writes_the_report(tmp_path):
    w, _, _ = planted(n_modeled(), 6, 3, seed=1)
    write_run(tmp_path / "run", state_dicts(w))
    r = cli("run", tmp_path / "run", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout
    result = run_all(tmp_path / "run", tmp_path / "out")  # replaces its own report
    assert result.report.out == str(tmp_path / "out" / "report")
    html = (tmp_path / "out" / "report" / "report.html").read_text()
    assert len(_embedded_pngs(html)) == len(FIGURES)


def test_schema_is_documented_and_render_script_explains_missing_chromium(tmp_path):
    assert set(SCHEMA["required"]) <= set(SCHEMA["properties"])
    html = tmp_path / "report.html"
    html.write_text("<html></html>")
    r = subprocess.run(
        [sys.executable, REPO / "scripts" / "render_report.py", html, "--chromium",
         tmp_path / "no-chromium"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 3 and "apt-get install chromium" in r.stderr


def test_reference_names_constants_and_high_error_epochs(tmp_path):
    # guards: report.data.locate (reference names), the constant count and
    # high_error_epochs, figures._largest (natural order) and html's settings/notes
    import torch

    layout = [
        (f"layer.{i}.weight", (12, 8), torch.float32) for i in (10, 2, 1)
    ] + [("layer.2.bias", (12,), torch.float32)]
    n = 3 * 96 + 12
    w, _, _ = planted(n, 14, 3, seed=2, noise=0.02)
    w[:288, 0] = 1e-3 * np.random.default_rng(0).normal(size=288)  # near-zero first epoch
    w[288:] = 0.5  # the bias never moves: constant
    write_run(tmp_path / "run", state_dicts(w, layout))
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    CMD(3, n_samples=200).fit(store)
    summary = write_report(store, tmp_path / "rep")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    g = zarr.open_group(store, mode="r")
    params = g.attrs["cmdtool"]["params"]
    for k, col in enumerate(np.asarray(g["cmd"]["ref_index"][:])):
        p = next(p for p in params if p["offset"] <= col < p["offset"] + np.prod(p["shape"]))
        idx = list(np.unravel_index(int(col) - p["offset"], p["shape"]))
        got = report["references"][k]
        assert got["column"] == col and got["tensor"] == p["name"] and got["index"] == idx
        assert got["name"] == f"{p['name']}[{idx[0]}, {idx[1]}]"
    bias = next(p for p in params if p["name"] == "layer.2.bias")["offset"]
    const = np.zeros(n, dtype=bool)
    const[bias : bias + 12] = True
    labels = np.asarray(g["cmd"]["labels"][:])
    assert report["constant"] == 12
    assert report["mode_sizes"] == np.bincount(labels[~const], minlength=3).tolist()
    per_epoch = report["relative_error"]["per_epoch"]
    assert per_epoch[0] > 1 and all(e <= 1 for e in per_epoch[1:])
    assert [h["epoch"] for h in report["high_error_epochs"]] == [1]
    html = Path(summary.html).read_text()
    assert "Epochs rebuilt with a relative error above 1" in html and "--epochs A:" in html
    assert "constant parameters" in html and "12 (" in html
    from cmdtool.report.figures import natural_key

    names = ["layer.10.weight", "layer.2.bias", "layer.1.weight", "layer.2.weight"]
    assert sorted(names, key=natural_key) == [
        "layer.1.weight", "layer.2.bias", "layer.2.weight", "layer.10.weight"
    ]
