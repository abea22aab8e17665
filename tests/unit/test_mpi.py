"""hpcdask mpi's layout and its bad inputs, with a stand-in communicator (the real MPI world,
under srun --mpi=pmi2 in the image, is tests/slurm/test_slurm_mpi.py)."""

from __future__ import annotations

import asyncio

import pytest

from hpcdask import mpi
from hpcdask.errors import BadInput


class World:
    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank

    def Get_size(self) -> int:
        return self.size

    def Get_rank(self) -> int:
        return self.rank


def test_roles_are_dask_mpis():
    assert [mpi.role(r) for r in range(5)] == ["scheduler", "client", "worker", "worker", "worker"]


@pytest.mark.parametrize("size", [1, 2])
def test_a_world_of_fewer_than_3_ranks_is_refused_naming_the_fix(tmp_path, size):
    script = tmp_path / "s.py"
    script.write_text("")
    with pytest.raises(BadInput, match=rf"at least 3 MPI ranks .* found {size}; .*--mpi=pmi2 -n 4"):
        mpi.run(script, (), tmp_path / "sched.json", None, True, comm=World(size))
    assert list(tmp_path.iterdir()) == [script]  # nothing written


def test_a_missing_script_is_refused_before_any_role_starts(tmp_path):
    with pytest.raises(BadInput, match=r"script .*nope.py does not exist"):
        mpi.run(tmp_path / "nope.py", (), tmp_path / "sched.json", None, True, comm=World(4))
    assert list(tmp_path.iterdir()) == []


class Request:
    def __init__(self, after: int, value) -> None:
        self.after, self.value, self.cancelled = after, value, False

    def test(self):
        self.after -= 1
        return (self.after <= 0, self.value if self.after <= 0 else None)

    def Cancel(self) -> None:
        self.cancelled = True


class Comm:
    def __init__(self, req: Request) -> None:
        self.req, self.posted = req, None

    def irecv(self, source: int, tag: int) -> Request:
        self.posted = (source, tag)
        return self.req


def test_rank_0_stops_when_the_client_rank_says_so():
    comm = Comm(Request(3, 0))
    why = asyncio.run(mpi._client_done(comm))
    assert why == "the client rank is done (exit 0)"
    assert comm.posted == (mpi.CLIENT, mpi.DONE_TAG) and not comm.req.cancelled


def test_rank_0_stopped_otherwise_leaves_no_receive_posted():
    comm = Comm(Request(10**9, None))

    async def main():
        t = asyncio.ensure_future(mpi._client_done(comm))
        await asyncio.sleep(0.3)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert comm.req.cancelled
