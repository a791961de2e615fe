"""Results-group names (``--name``) cannot take a name the store itself uses, nor path
syntax (issue 11): ``decompose --name zarr.json`` used to replace the store's metadata."""

from __future__ import annotations

import pytest

from cmdtool.decomposition import CMD
from cmdtool.errors import UsageError
from cmdtool.ingestion import ingest
from cmdtool.store.layout import check_result_name, scratch_result_name
from tests.conftest import n_modeled, planted, run_cli, state_dicts, tree_digest, write_run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    w, _, _ = planted(n_modeled(), 6, 2, seed=6)
    write_run(tmp / "run", state_dicts(w))
    store = tmp / "s.zarr"
    ingest(tmp / "run", store)
    CMD(2, n_samples=200).fit(store)
    return store


def test_decompose_refuses_the_stores_own_names(fitted):
    name = "zarr.json"  # it replaced the store's root metadata: every later command exit 6
    before = tree_digest(fitted)
    r = run_cli("decompose", fitted, "--name", name, "--samples", "100")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"--name {name!r} is not usable" in lines[0], r.stderr
    assert tree_digest(fitted) == before


@pytest.mark.parametrize(
    "name",
    [
        "zarr.json",
        "ZARR.JSON",  # a case-insensitive file system
        "zarr.array",
        "weights",
        "Weights",
        "extras",
        "pool",
        "pool_index",
        "pool2",
        "cmd.old",  # .partial-cmd.old is what publishing renames the old group to
        "x.partial",
        "x.tmp",
        ".partial-cmd",
        ".scratch-x",
        ".cmdtool-lock",
        "a/b",
        "..",
        "cmd\n",
        "c d",
        "x" * 201,
        "",
    ],
)
def test_reserved_and_path_like_names_are_refused(name):
    with pytest.raises(UsageError, match="is not usable"):
        check_result_name(name)


@pytest.mark.parametrize("name", ["cmd", "run-1.v2", "M10", "x" * 200])
def test_plain_names_are_accepted(name):
    assert check_result_name(name) == name


def test_scratch_names_of_sweep_are_accepted():
    name = scratch_result_name()
    assert check_result_name(name) == name
