import torch
import torch.distributed as dist

from tests.dist_harness import run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t


def _fail(rank, world_size):
    if rank == 1:
        raise KeyError("boom on rank 1")
    return rank


def test_gloo_all_reduce_two_ranks():
    out = run_ranks(_sum_ranks, 2)
    assert [float(o) for o in out] == [3.0, 3.0]


def test_rank_error_is_reported():
    import pytest

    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_ranks(_fail, 2)
