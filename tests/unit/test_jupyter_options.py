"""hpcdask jupyter behind a reverse proxy (Open OnDemand): its prefix, token and address, and
the lab's dashboard proxy that keeps the token to itself. End to end: tests/slurm/test_ondemand.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hpcdask import jupyter
from hpcdask.errors import BadInput


@pytest.mark.parametrize("given, url", [("/", "/"), ("/node/node1/4000", "/node/node1/4000/"),
                                        ("/node/node1/4000/", "/node/node1/4000/"),
                                        ("//lab//", "/lab/")])
def test_base_url_has_one_slash_at_each_end(given, url):
    assert jupyter.base_url_of(given) == url


@pytest.mark.parametrize("given", ["node/x/1/", "/a b/", "/x?y", "", "/x#y"])
def test_base_url_not_a_path_is_refused(given):
    with pytest.raises(BadInput, match=r"give a path that starts with /.* --base-url /node/"):
        jupyter.base_url_of(given)


def test_token_from_the_environment_or_random(monkeypatch):
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    first, second = jupyter.lab_token(), jupyter.lab_token()
    assert first != second and len(first) >= 32
    monkeypatch.setenv("JUPYTER_TOKEN", "a" * 16)
    assert jupyter.lab_token() == "a" * 16
    for bad in ("a" * 15, "a" * 10 + " " + "a" * 10, ""):
        monkeypatch.setenv("JUPYTER_TOKEN", bad)
        with pytest.raises(BadInput, match="give at least 16 without spaces"):
            jupyter.lab_token()


def test_listen_address_is_this_nodes():
    assert jupyter.listen_address("127.0.0.1") == "127.0.0.1"
    assert jupyter.listen_address("localhost") == "127.0.0.1"
    with pytest.raises(BadInput, match=r"192\.0\.2\.254 \(192\.0\.2\.254\) is not an address"):
        jupyter.listen_address("192.0.2.254")  # TEST-NET-1: never this machine's


class Upstream:
    """jupyter-server-proxy's URI: the path, then the request's query as it came."""

    def get_client_uri(self, protocol, host, port, proxied_path):
        return f"{protocol}://{host}:{port}{proxied_path}?{self.request.query}"


class Handler(jupyter._DashboardProxy, Upstream):
    def __init__(self, query: str) -> None:
        self.request = SimpleNamespace(query=query)


@pytest.mark.parametrize("query, uri", [
    ("token=secret", "ws://127.0.0.1:8787/status/ws"),
    ("token=secret&bokeh-autoload=1", "ws://127.0.0.1:8787/status/ws?bokeh-autoload=1"),
    ("a=1&token=secret&b=%20", "ws://127.0.0.1:8787/status/ws?a=1&b=%20"),
    ("tokens=1", "ws://127.0.0.1:8787/status/ws?tokens=1"),
])
def test_the_dashboard_never_gets_the_labs_token(query, uri):
    assert Handler(query).get_client_uri("ws", "127.0.0.1", 8787, "/status/ws") == uri
