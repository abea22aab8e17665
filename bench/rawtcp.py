"""Raw TCP between two test-cluster nodes: the physical limit the Dask transfer is compared to.

    python bench/rawtcp.py recv HOST PORTFILE NBYTES   # binds HOST:0, writes the port, prints JSON
    python bench/rawtcp.py send HOST PORT NBYTES

Run each side inside its node's network namespace (``nsenter --net=/run/netns/hpcd-nodeI``).
The receiver reads into one preallocated buffer (as Dask does for large frames) and reports
the time from the connection's first byte to its last.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

CHUNK = 4 << 20


def recv(host: str, portfile: str, nbytes: int) -> None:
    srv = socket.create_server((host, 0))
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.replace(tmp, portfile)
    conn, _ = srv.accept()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = conn.recv_into(view[:CHUNK])
    t0 = time.perf_counter()
    while got < nbytes:
        n = conn.recv_into(view[got:got + CHUNK])
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    conn.close()
    srv.close()
    print(json.dumps({"bytes": got, "seconds": dt, "bandwidth": got / dt if dt else None}))


def send(host: str, port: int, nbytes: int) -> None:
    data = bytes(nbytes)
    with socket.create_connection((host, port)) as s:
        s.sendall(data)


if __name__ == "__main__":
    mode, host, where, size = sys.argv[1:5]
    if mode == "recv":
        recv(host, where, int(float(size)))
    else:
        send(host, int(where), int(float(size)))
