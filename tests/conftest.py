import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/problems.py
# One intra-op thread for the whole suite: its tensors are tiny, so a second thread only adds
# synchronisation, and on a shared 2-core machine two threads spin against the other work (with two,
# test_implicit.py::test_gradcheck_float64 took 22 s beside a training campaign; with one, 3 s).
# Tests that need more set it themselves and restore it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
