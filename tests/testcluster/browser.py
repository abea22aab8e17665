"""A real headless Chromium, driven through the DevTools protocol.

`chromium --screenshot` takes its picture when the page's *virtual* time runs out, and a page
that draws from a websocket (the Dask dashboard: Bokeh pulls its document over
`/status/ws`) is then still empty: only the menu bar is drawn. Here the browser runs in real
time: the page is loaded, a JavaScript condition is polled until it holds, and only then is
the screenshot taken. The DevTools websocket is spoken with websocket-client (in the image's
lock through jupyter-server).
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import websocket

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,800", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0"]

# Bokeh's document arrived over its websocket and has views drawn.
BOKEH_DRAWN = ("!!(window.Bokeh && Bokeh.documents.length"
               " && Bokeh.documents[0].roots().length && Bokeh.index"
               " && Object.keys(Bokeh.index).length + (Bokeh.index.roots||[]).length > 0)")


class Page:
    def __init__(self, ws: websocket.WebSocket):
        self.ws = ws
        self.ids = itertools.count(1)
        self.console: list[str] = []

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                             for a in args))
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")


def screenshot(url: str, out: Path, *, ready: str = "document.readyState === 'complete'",
               timeout: float = 60, settle: float = 1.0) -> dict:
    """Load `url`, wait until the JavaScript `ready` is true, save a PNG to `out`.

    Returns what the page showed: its title, the console lines and the time `ready` took.
    Raises AssertionError naming the console's lines when `ready` never holds.
    """
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: apt-get install chromium (tests/setup-host.sh)"
    profile = Path(tempfile.mkdtemp(prefix="hpcdask-chromium-"))
    proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(proc, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30,
                                         suppress_origin=True)
        try:
            page = Page(ws)
            page.call("Runtime.enable")
            page.call("Page.enable")
            t0 = time.monotonic()
            page.call("Page.navigate", url=url)
            while not page.evaluate(ready):
                if time.monotonic() - t0 > timeout:
                    raise AssertionError(f"{url}: {ready} not true in {timeout:.0f}s; "
                                         f"console: {page.console[-20:]}")
                time.sleep(0.25)
            took = time.monotonic() - t0
            time.sleep(settle)  # the first frame after the condition
            data = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
            out.write_bytes(data)
            return {"title": page.evaluate("document.title"), "console": page.console,
                    "ready_s": took}
        finally:
            ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def _drain(stream) -> None:
    try:
        while stream.read(65536):
            pass
    except (OSError, ValueError):  # closed by screenshot()'s cleanup
        pass


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            # Drain the rest of stderr in the background so Chromium never blocks on it.
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return int(m.group(1))
    raise AssertionError("chromium gave no DevTools port: " + "".join(seen)[-2000:])


def bokeh_column(name: str) -> str:
    """JavaScript: every value of the column `name` in the page's Bokeh data sources, as one
    JSON string (the dashboard's tables draw from these)."""
    return ("(() => { const out = [];"
            " for (const m of Bokeh.documents[0]._all_models.values()) {"
            "  const d = m.data; if (!d) continue;"
            f"  const c = d instanceof Map ? d.get({name!r}) : d[{name!r}];"
            "  if (c) out.push(Array.from(c).map(String)); }"
            " return JSON.stringify(out); })()")
