"""netif.check_port_free: taken means what the server would find when it binds."""

from __future__ import annotations

import socket
import subprocess

import pytest

from hpcdask import netif
from hpcdask.errors import BadInput


def _time_wait_on_a_closed_server_port() -> int:
    """A port whose server has gone, with its side of a connection left in TIME_WAIT (the
    server closed first, as an HTTP server does after answering a `Connection: close` request)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado's servers bind
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server's side closes first: it ends in TIME_WAIT
    cli.recv(1)
    cli.close()
    srv.close()
    return port


def test_time_wait_of_an_earlier_server_does_not_make_a_port_taken():
    port = _time_wait_on_a_closed_server_port()
    ss = subprocess.run(["ss", "-Htan", "state", "time-wait", f"sport = :{port}"],
                        capture_output=True, text=True)
    assert str(port) in ss.stdout, ss.stdout  # the case is real: a TIME_WAIT on that port
    netif.check_port_free("127.0.0.1", port, "--port")


def test_a_listening_port_is_taken():
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado binds
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with pytest.raises(BadInput, match=rf"port {port} on 127\.0\.0\.1 is already in use; "
                                           r"pick another with --port PORT"):
            netif.check_port_free("127.0.0.1", port, "--port")
        assert netif.port_or_any("127.0.0.1", port) == 0
