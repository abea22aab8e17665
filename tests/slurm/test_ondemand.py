"""The Open OnDemand app (ondemand/hpcdask-jupyter, issue 25 item 2) on the Slurm test cluster.

OnDemand itself cannot run here, so the test does what it does, step by step:
- renders the app's ERB files with real Ruby, with the values its form posts (form attributes
  are methods of the session context, as in OnDemand's batch connect);
- wraps before.sh and script.sh in the job script of OnDemand's "basic" batch connect template
  (ood_core's BatchConnect::Template: the helpers find_port and create_passwd, host=$(hostname),
  source before.sh, fork script.sh, write connection.yml 0600, wait), written here from its
  documented behaviour;
- submits it as hpcuser with the sbatch options OnDemand's Slurm adapter adds (-t from the
  hours, -A from the account) plus submit.yml's native ones;
- puts Debian's nginx in front, configured like OnDemand's node proxy: /node/HOST/PORT/... goes
  to HOST:PORT with the full path kept and websockets upgraded, for the cluster's nodes only (a
  site's host_regex), on the host as OnDemand's web node sits beside the compute nodes.
Through that proxy: the lab answers 200 with the token and not without it, a kernel's websocket
runs code that reaches the cluster, the dashboard's /status page and its websocket work (a real
headless Chromium draws it), the Connect button of view.html.erb opens the lab, and the lab's
shutdown ends the job in order.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import websocket
import yaml

from test_slurm_jobs import assert_clean, wait_for_text
from testcluster import browser

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

APP = Path(__file__).resolve().parents[2] / "ondemand" / "hpcdask-jupyter"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# OnDemand renders an app's ERB files in the session's context: each form attribute is a method
# there, and `context` is the context itself. Arguments: app folder, output folder, JSON file of
# the form's values, then the files to render (view.html.erb: later, with connection.yml's values).
RENDER = r"""
require "erb"
require "fileutils"
require "json"
class Session
  def initialize(values)
    values.each { |k, v| define_singleton_method(k) { v } }
  end
  def context
    self
  end
  def render(path)
    ERB.new(File.read(path), trim_mode: "-").result(binding)
  end
end
app, out, values, *files = ARGV
s = Session.new(JSON.parse(File.read(values)))
files.each do |name|
  src = File.join(app, name)
  # template/ is staged as the job's working folder itself
  dest = File.join(out, name.delete_suffix(".erb").delete_prefix("template/"))
  FileUtils.mkdir_p(File.dirname(dest))
  File.write(dest, s.render(src))
  File.chmod(File.stat(src).mode & 0o777, dest)
end
"""

# OnDemand's "basic" batch connect job script, as ood_core documents it (its helpers, the host,
# before.sh sourced, script.sh forked, connection.yml written 0600, the script waited for).
OOD_JOB = r"""#!/bin/bash
cd {workdir}
port_used() {{ (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }}
find_port() {{
    local host=${{1:-localhost}} port
    port=$(shuf -i 2000-65535 -n 1)
    while port_used "$host" "$port"; do port=$(shuf -i 2000-65535 -n 1); done
    echo "$port"
}}
create_passwd() {{ tr -cd '[:alnum:]' </dev/urandom 2>/dev/null | head -c"${{1:-32}}"; }}
host=$(hostname)
[[ -e before.sh ]] && source before.sh
export host port
echo "Script starting..."
./script.sh &
SCRIPT_PID=$!
[[ -e after.sh ]] && source after.sh
(umask 077; printf 'host: %s\nport: %s\npassword: %s\n' "$host" "$port" "$password" \
    > connection.yml)
wait $SCRIPT_PID
"""

# OnDemand's node proxy (/node/: the full path kept), for the cluster's nodes only.
NGINX = """\
worker_processes 1;
daemon off;
user nobody nogroup;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    map $node_host $node_addr {{ default ""; {hosts} }}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/node/(?<node_host>[^/]+)/(?<node_port>\\d+)(/.*)?$ {{
            if ($node_addr = "") {{ return 404; }}
            proxy_pass http://$node_addr:$node_port;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, str]:
    """GET (or METHOD) URL without following redirects: (status, body)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    req = urllib.request.Request(url, method=method,
                                 headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def run_in_kernel(ws_url: str, token: str, code: str, timeout: float = 120) -> str:
    """Execute CODE in a kernel over its websocket (Jupyter's JSON protocol): its stdout."""
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"],
                                     timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply":
                return "".join(out)
        raise AssertionError(f"no execute_reply in {timeout}s; stdout so far: {out}")
    finally:
        ws.close()


@pytest.fixture
def node_proxy(slurm_cluster):
    """nginx as OnDemand's node proxy on the host (its web node): the base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is missing: apt-get install nginx (tests/setup-host.sh)"
    d = Path(tempfile.mkdtemp(prefix="hpcdask-nginx-"))
    d.chmod(0o755)
    port = free_port()
    hosts = " ".join(f"{n} {a};" for n, a in slurm_cluster.eth_addresses.items())
    (d / "nginx.conf").write_text(NGINX.format(d=d, port=port, hosts=hosts))
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(d / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(f"http://127.0.0.1:{port}/node/nonode/1/")[0] == 404:
                    break
            except urllib.error.URLError:  # not listening yet
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


def render(values: dict, out: Path, *files: str) -> None:
    """Render the app's FILES with the form's VALUES into OUT, as OnDemand does."""
    (out / "values.json").write_text(json.dumps(values))
    proc = subprocess.run(["ruby", "-e", RENDER, str(APP), str(out), str(out / "values.json"),
                           *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ondemand_app_serves_the_lab_and_dashboard_through_the_node_proxy(
        slurm_cluster, job_env, sif, udir, node_proxy):
    form = yaml.safe_load((APP / "form.yml").read_text())
    # The form asks for the account, the hours, the nodes and the memory.
    assert {"bc_account", "bc_num_hours", "bc_num_slots", "memory_gb"} <= set(form["form"])
    values = {k: a.get("value", "") for k, a in form["attributes"].items()}
    values.update(bc_account="hpcuser", bc_num_hours="1", bc_num_slots="2", memory_gb="2",
                  hpcdask_image=str(sif),
                  hpcdask_jobscripts=str(slurm_cluster.src / "jobscripts"))
    render(values, udir, "submit.yml.erb", "template/before.sh.erb", "template/script.sh.erb")
    submit_yml = yaml.safe_load((udir / "submit.yml").read_text())
    assert submit_yml["batch_connect"]["template"] == "basic"
    native = submit_yml["script"]["native"]
    assert "--nodes=2" in native and "--mem=2G" in native, native
    (udir / "job.sh").write_text(OOD_JOB.format(workdir=udir))
    (udir / "job.sh").chmod(0o755)
    slurm_cluster.give(udir)
    # OnDemand's Slurm adapter: -t from bc_num_hours, -A from bc_account, -J, -o.
    opts = [f"--time={int(values['bc_num_hours']):02d}:00:00", f"-A{values['bc_account']}",
            "-Jood/hpcdask-jupyter", f"--output={udir}/output.log", *native]
    env = {"HPCDASK_SHARED_DIR": job_env["HPCDASK_SHARED_DIR"]}
    out = slurm_cluster.run(["sbatch", "--parsable", *opts, str(udir / "job.sh")], env=env,
                            cwd=udir).stdout
    job_id = out.strip().split(";")[0]
    log = udir / "output.log"
    shared = Path(job_env["HPCDASK_SHARED_DIR"])
    try:
        wait_for_text(log, r"Jupyter Server .* is running at", 300)
        conn = yaml.safe_load((udir / "connection.yml").read_text())
        assert (udir / "connection.yml").stat().st_mode & 0o077 == 0
        host, port, token = conn["host"], conn["port"], str(conn["password"])
        assert host in slurm_cluster.nodes and len(token) == 32
        text = log.read_text()
        # The lab on the node's own address (eth0, where OnDemand's web node reaches it) under
        # OnDemand's prefix; the dashboard on loopback, linked through the lab.
        assert re.search(rf"jupyter: listening on {re.escape(slurm_cluster.eth_addresses[host])}"
                         rf":{port} under /node/{host}/{port}/ ", text), text
        m = re.search(rf"the dashboard, through the lab: /node/{host}/{port}/proxy/127\.0\.0\.1:"
                      r"(\d+)/status \(behind the same proxy", text)
        assert m, text
        dash = m.group(1)
        base = f"{node_proxy}/node/{host}/{port}"

        # The lab, through the proxy: 200 with the token, a login page (302) without.
        assert get(f"{base}/lab", token)[0] == 200
        assert get(f"{base}/lab")[0] == 302
        assert get(f"{base}/api/status")[0] == 403
        # Another node's /node/ URL, a host outside the cluster: the proxy's 404 (host_regex).
        assert get(f"{node_proxy}/node/example.org/80/")[0] == 404

        # A kernel, over its websocket through nginx: it reaches the cluster (2 workers) and its
        # dashboard link is the lab's own, under the prefix.
        code, body = get(f"{base}/api/kernels", token, method="POST")
        assert code == 201, body
        kernel = json.loads(body)["id"]
        ws_url = f"{base.replace('http://', 'ws://')}/api/kernels/{kernel}/channels"
        printed = run_in_kernel(ws_url, token, (
            "import hpcdask\nc = hpcdask.client()\n"
            "print(len(c.scheduler_info()['workers']), c.dashboard_link)"))
        assert printed.split() == ["2", f"/node/{host}/{port}/proxy/127.0.0.1:{dash}/status"]

        # The dashboard through the lab: with the token only, for that host and port only.
        status = f"{base}/proxy/127.0.0.1:{dash}/status"
        code, body = get(status, token)
        assert code == 200 and "bokeh" in body.lower()
        assert get(status)[0] in (302, 403)
        assert get(f"{base}/proxy/127.0.0.1:6818/", token)[0] == 403
        assert get(f"{base}/proxy/{slurm_cluster.eth_addresses[host]}:{dash}/", token)[0] == 403

        # The session card's Connect button opens the lab in a real browser; the dashboard's
        # page draws from its websocket through both proxies.
        render({**values, **conn}, udir, "view.html.erb")  # with connection.yml's values
        href = re.search(r'href="([^"]+)"', (udir / "view.html").read_text()).group(1)
        assert href == f"/node/{host}/{port}/lab?token={token}"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        seen = browser.screenshot(node_proxy + href, ARTIFACTS / "ondemand-lab.png",
                                  ready="!!document.querySelector('.jp-LabShell')"
                                        " && !!document.querySelector('.jp-DirListing')",
                                  timeout=120)
        assert "JupyterLab" in seen["title"], seen
        seen = browser.screenshot(f"{status}?token={token}", ARTIFACTS / "ondemand-dashboard.png",
                                  ready=browser.BOKEH_DRAWN, timeout=90)
        assert seen["title"].startswith("Dask"), seen

        # File > Shut Down, through the proxy: the lab ends, and with it the job, in order.
        assert get(f"{base}/api/shutdown", token, method="POST")[0] == 200
        res = slurm_cluster.wait(job_id, timeout=300, workdir=udir)
    finally:
        slurm_cluster.run(["scancel", job_id], check=False)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert_clean(slurm_cluster, res, shared)
    assert token not in log.read_text()
