import os

import pytest
import torch

# Two cores: keep each test process (and each spawned rank) single-threaded so multi-rank tests do not thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
