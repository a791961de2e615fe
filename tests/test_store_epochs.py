import numpy as np
import pytest

from cmdtool.errors import EpochNotFoundError, UsageError
from cmdtool.store.epochs import select_epochs, select_window

LABELS = [1, 2, 3, 5, 8, 13, 21]


def test_window_is_half_open_on_labels_with_stride():
    assert select_window(LABELS, "2:13").tolist() == [1, 2, 3, 4]
    assert select_window(LABELS, "5:").tolist() == [3, 4, 5, 6]
    assert select_window(LABELS, ":4").tolist() == [0, 1, 2]
    assert select_window(LABELS, None, 3).tolist() == [0, 3, 6]


def test_window_errors():
    with pytest.raises(UsageError, match="no stored epoch"):
        select_window(LABELS, "30:40")
    with pytest.raises(UsageError, match="stride=0"):
        select_window(LABELS, None, 0)
    with pytest.raises(UsageError, match="A:B"):
        select_window(LABELS, "3")


def test_epoch_specs():
    assert select_epochs(LABELS, "last").tolist() == [6]
    assert np.array_equal(select_epochs(LABELS, "all"), np.arange(7))
    assert select_epochs(LABELS, "3:9").tolist() == [2, 3, 4]
    assert select_epochs(LABELS, "21,1,8").tolist() == [6, 0, 4]
    with pytest.raises(EpochNotFoundError, match="epoch 4 is not in the store"):
        select_epochs(LABELS, "3,4")
    with pytest.raises(UsageError, match="'x' is not an integer"):
        select_epochs(LABELS, "1,x")


HUGE = 10**20  # beyond int64: labels are Python ints


def test_labels_beyond_int64_select_as_python_ints():
    labels = [HUGE, HUGE + 1, HUGE + 2, HUGE + 10]
    assert select_window(labels, f"{HUGE + 1}:").tolist() == [1, 2, 3]
    assert select_window(labels, f"{HUGE}:{HUGE + 2}").tolist() == [0, 1]
    assert select_epochs(labels, f"{HUGE + 10},{HUGE}").tolist() == [3, 0]
    assert select_epochs(labels, f":{HUGE + 3}").tolist() == [0, 1, 2]
    assert select_window(LABELS, f"-{HUGE}:{HUGE}").tolist() == list(range(7))
    with pytest.raises(UsageError, match="no stored epoch"):
        select_window(LABELS, f"{HUGE}:")
