import numpy as np
import pytest

from cmdtool.errors import UsageError
from cmdtool.method.clustering import abs_corr, find_modes
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
