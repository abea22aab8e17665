"""hpcdask.cluster.sge_cluster's check of the worker jobs' request by the real Grid Engine (issue
22, bad input): ``qsub -w v`` as hpcuser on the login node (through ``submit_prefix``, as a
site's ``ssh login1``), before any job, credential or folder exists. sge_cluster runs in this
process (outside the image: ``require_image=False``), its scheduler on loopback.
"""

from __future__ import annotations

import re

import pytest

from hpcdask import cluster, config
from hpcdask.errors import BadInput
from testcluster.cluster import CLUSTER_SH

pytestmark = [pytest.mark.sge]

# qsub and friends as hpcuser on the test cluster's login node.
PREFIX = f"env HPCDASK_CLUSTER_BATCH=sge bash {CLUSTER_SH} login"


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCDASK_SHARED_DIR", str(tmp_path / "shared"))
    config.reconfigure()
    yield tmp_path / "shared"
    monkeypatch.delenv("HPCDASK_SHARED_DIR")
    config.reconfigure()


def sge(**kwargs):
    return cluster.sge_cluster("/img", submit_prefix=PREFIX, cores=1, scheduler_interface="lo",
                               require_image=False, dashboard="off", **kwargs)


def nothing_made(shared) -> None:
    assert not shared.exists() or not list(shared.iterdir()), list(shared.iterdir())


def test_a_queue_that_does_not_exist_is_one_line(sge_cluster, shared):
    with pytest.raises(BadInput) as err:
        sge(memory="1GiB", queue="nosuchq")
    assert str(err.value) == ("queue 'nosuchq' does not exist on this Grid Engine cluster; list its "
                              "queues with `qstat -g c` and name one: sge_cluster(queue='all.q', ...)")
    nothing_made(shared)


def test_h_vmem_where_the_site_forces_it(sge_cluster, shared):
    """A site requires h_vmem of every job by making it FORCED (qconf -mc): Grid Engine then
    accepts a job without it, which pends forever ("does not request 'forced' resource"). Asked
    without h_vmem, sge_cluster says so in one line; with memory= (h_vmem in Grid Engine's M:
    it refuses dask's "GiB"), Grid Engine accepts the request."""
    c = sge_cluster
    complexes = c.admin("qconf", "-sc").stdout
    forced = re.sub(r"^(h_vmem\s+h_vmem\s+MEMORY\s+<=\s+)YES(\s+YES\s+)\S+", r"\1FORCED\g<2>0",
                    complexes, flags=re.M)
    assert forced != complexes, complexes
    path = c.state_dir / "pytest-complexes"  # where the master (its own /tmp) reads it
    try:
        path.write_text(forced)
        c.admin("qconf", "-Mc", str(path))
        with pytest.raises(BadInput) as err:
            sge(memory="1GiB", resource_spec="mem_free=1G")
        assert re.fullmatch(r"this site requires every job to ask for h_vmem \(Grid Engine: .*\); "
                            r"ask for it: sge_cluster\(resource_spec='mem_free=1G,h_vmem=\.\.\.', "
                            r"\.\.\.\)", str(err.value)), str(err.value)
        nothing_made(shared)
        with sge(memory="3000MiB", walltime="00:10:00") as ok:
            assert "#$ -l h_vmem=3000M" in ok.job_script().splitlines()
    finally:
        path.write_text(complexes)
        c.admin("qconf", "-Mc", str(path))
        path.unlink()
    assert c.admin("qconf", "-sc").stdout == complexes
    nothing_made(shared)
