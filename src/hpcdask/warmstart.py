"""The warm worker server's preload (:mod:`hpcdask.warm`): importing it, in the one process
per node that forks the worker processes, imports what they need, once.

Before anything else is imported: the libraries that start threads as they load (the BLAS
pools, pyarrow's jemalloc) load here with one thread and no background thread, so the
server forks from a process of one thread. The environment is restored after the imports, and
each forked worker sizes its pools from it (:func:`hpcdask.warm.size_pools`)."""

import os

# (Not OMP_NUM_THREADS: OpenMP starts no thread when it loads, and each thread takes its pool
# size from it as it was then; a forked worker could not size the pools of its task threads.)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "JE_ARROW_MALLOC_CONF": "background_thread:false"}
_saved = {k: os.environ.get(k) for k in ONE_THREAD}
os.environ.update(ONE_THREAD)

from hpcdask import warm  # noqa: E402  (after the environment above)

warm.serve(_saved)
