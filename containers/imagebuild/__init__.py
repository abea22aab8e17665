"""Build dask.sif without Apptainer: how ``make sif`` and ``make image`` build the image when no
Apptainer is on PATH.

- ``base.sh``: ``debootstrap --variant=minbase bookworm`` in place of ``From: debian:bookworm-slim``;
- ``image.py``: ``containers/dask.def``'s sections run into a copy of it, a sandbox folder laid
  out as ``apptainer build --sandbox`` makes it (cached by its inputs);
- ``sif.py``: that sandbox assembled into a SIF file as ``apptainer build`` does (mksquashfs + siftool).

Run from the repository root (``containers`` on ``PYTHONPATH``, as the Makefile does)::

    PYTHONPATH=containers python3 -m imagebuild.sif build --out dask.sif   # make sif
    PYTHONPATH=containers python3 -m imagebuild.image build                # make image

Needs root, debootstrap, bubblewrap, squashfs-tools and siftool (``tests/setup-host.sh``).
"""
