import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from cmdtool.errors import UsageError
from cmdtool.method.clustering import abs_corr, find_modes, row_distances
from tests import cmd_reference as ref
from tests.conftest import planted


def test_abs_corr_matches_numpy_corrcoef_and_constant_rows_are_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 15))
    x[2] = 7.5  # constant
    c = abs_corr(x)
    keep = [0, 1, 3, 4, 5]
    expected = np.abs(np.corrcoef(x[keep]))
    assert np.allclose(c[np.ix_(keep, keep)], expected, atol=1e-12)
    assert np.all(c[2] == 0) and np.all(c[:, 2] == 0)
    assert not np.isnan(c).any()


@pytest.mark.parametrize(("n_modes", "threshold"), [(3, None), (6, None), (None, 0.5)])
def test_modes_and_references_equal_the_reference_implementation(n_modes, threshold):
    w, _, _ = planted(300, 20, 4, seed=1, noise=0.3)
    modes = find_modes(w, n_modes=n_modes, threshold=threshold)
    labels, ref_rows = ref.cluster(w, n_modes=n_modes, threshold=threshold)
    assert np.array_equal(modes.labels, labels)
    assert np.array_equal(modes.ref_rows, ref_rows)
    sizes = np.bincount(modes.labels)
    assert np.all(np.diff(sizes) <= 0)  # numbered by size, largest first


def test_bad_mode_counts():
    w, _, _ = planted(20, 5, 2)
    with pytest.raises(UsageError, match="n_modes=0"):
        find_modes(w, n_modes=0)
    with pytest.raises(
        UsageError, match=r"n_modes=21 must be >= 1 and <= the number of samples 20$"
    ):
        find_modes(w, n_modes=21)
    with pytest.raises(UsageError, match=r"threshold=1\.5"):
        find_modes(w, threshold=1.5)


def _cases():
    """The tests' cases and random ones with ties: duplicate and sign-flipped rows
    (equal |corr| rows), noiseless groups, values on a coarse grid."""
    rng = np.random.default_rng(11)
    yield "planted", planted(300, 20, 4, seed=1, noise=0.3)[0]
    yield "noiseless", planted(200, 12, 5, seed=2, noise=0.0)[0]
    w = planted(400, 15, 6, seed=3, noise=0.5)[0]
    w[100:140] = w[0]  # duplicates
    w[140:160] = -2 * w[1] + 3  # same |corr| as row 1
    yield "duplicates", w
    yield "grid", np.round(rng.normal(size=(250, 6)))  # many equal |corr| values
    yield "k1000", planted(1000, 50, 8, seed=4, noise=1.0)[0]
    # every sample follows one trajectory up to scale, rounded to float32 (weight decay
    # alone does this): all |corr| rows nearly equal, which the plain Gram form cancels on
    base = rng.normal(size=(800, 1))
    yield "one trajectory", (base * (1 + 0.1 * np.arange(12))).astype(np.float32).astype(float)


def _scipy_modes(c: np.ndarray, n_modes, threshold):
    """Labels and reference rows from ``linkage(pdist(c), "complete")``: modes numbered
    by size, then first member; reference = largest mean |corr| in its mode, earliest."""
    d = pdist(c)
    tree = linkage(d, "complete")
    if n_modes is not None:
        raw = fcluster(tree, n_modes, "maxclust")
    else:
        raw = fcluster(tree, threshold * d.max(), "distance")
    keys = sorted(set(raw), key=lambda v: (-(raw == v).sum(), np.flatnonzero(raw == v)[0]))
    labels = np.array([keys.index(v) for v in raw])
    refs = []
    for mode in range(len(keys)):
        members = np.flatnonzero(labels == mode)
        refs.append(members[np.argmax(c[np.ix_(members, members)].mean(axis=1))])
    return labels, np.array(refs)


@pytest.mark.parametrize(("name", "w"), list(_cases()))
def test_fast_linkage_labels_equal_scipy_pdist_linkage(name, w):
    # guards: clustering.row_distances (Gram form with the near pairs recomputed) in
    # place of pdist: the complete-linkage labels and references are scipy's on the
    # same |corr| matrix, ties included
    c = abs_corr(w)
    d_fast, d_scipy = row_distances(c), pdist(c)
    assert np.array_equal(d_fast == 0, d_scipy == 0), name  # duplicates exactly 0 apart
    assert np.abs(d_fast - d_scipy).max() <= 1e-12 * max(1.0, d_scipy.max())
    for n_modes, threshold in [(2, None), (5, None), (12, None), (None, 0.3), (None, 0.7)]:
        modes = find_modes(w, n_modes=n_modes, threshold=threshold)
        live = np.flatnonzero(~ref.constant(w))  # constant rows take no part
        labels, ref_rows = _scipy_modes(c[np.ix_(live, live)], n_modes, threshold)
        assert np.all(modes.labels[~np.isin(np.arange(len(w)), live)] == -1)
        assert np.array_equal(modes.labels[live], labels), (name, n_modes, threshold)
        assert np.array_equal(modes.ref_rows, live[ref_rows]), (name, n_modes, threshold)


def test_two_member_modes_take_the_earlier_sample_as_reference():
    # guards: abs_corr's exact symmetry and unit diagonal (the DESIGN tie rule: equal
    # mean |corr| -> the earlier sample), measured wrong before (row 278 over 26)
    w = planted(300, 20, 4, seed=1, noise=0.3)[0]
    modes = find_modes(w, n_modes=12)
    c = modes.corr
    assert np.array_equal(c, c.T) and np.all(np.diag(c) == 1.0)
    for mode in range(modes.n_modes):
        members = np.flatnonzero(modes.labels == mode)
        if len(members) == 2:
            assert modes.ref_rows[mode] == members[0]
