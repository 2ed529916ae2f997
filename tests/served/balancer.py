"""nginx from Debian's packages as the load balancer in front of model-server replicas.

Started by the fleet tests on 127.0.0.1 with their own config file (no system config, no
``/var/log``), stopped by its pid. Its access log records, for every request, which
replicas nginx tried and what each answered (``$upstream_addr`` / ``$upstream_status``),
so a test can count the rows of one question per replica and see a killed replica's 502s.

``config()`` is the configuration ``docs/served.md`` shows for a fleet.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from oprm_rag.served.llama_server import stop_process

__all__ = ["Nginx", "find_nginx", "config", "Hop"]


def find_nginx() -> Path | None:
    """Debian's nginx (``apt-get install nginx``; ``make served-test`` does), or None."""
    for c in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if c and os.access(c, os.X_OK):
            return Path(c)
    return None


def config(upstreams: Sequence[str], port: int, folder: Path, *, policy: str = "least_conn", tries: int = 0) -> str:
    """An nginx config balancing ``upstreams`` (``host:port``) on 127.0.0.1:``port``.

    * ``least_conn``: a new request goes to the replica with the fewest in flight, so one
      question's concurrent chunk rows spread over the replicas;
    * ``max_fails=1 fail_timeout=30s``: a replica that fails is left out for 30 s;
    * ``proxy_next_upstream error timeout``: a request nginx could not hand to a replica
      (connection refused, a dropped keep-alive connection) goes to the next; one a replica
      took and then dropped (killed mid-request) is answered 502, and the client's retry
      reaches a live replica. ``tries`` (``proxy_next_upstream_tries``; 0: no limit) set to 1
      leaves every retry to the client;
    * ``proxy_buffering off``: streamed answers pass through as they come.
    """
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=30s;" for u in upstreams)
    user = "user root;\n" if os.geteuid() == 0 else ""
    f = folder
    return f"""{user}worker_processes 1;
daemon off;
pid {f}/nginx.pid;
error_log {f}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {f}/body;
    proxy_temp_path {f}/proxy;
    fastcgi_temp_path {f}/fastcgi;
    uwsgi_temp_path {f}/uwsgi;
    scgi_temp_path {f}/scgi;
    log_format fleet '$request_method $uri $status "$upstream_addr" "$upstream_status"';
    upstream replicas {{
        {policy};
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        access_log {f}/access.log fleet;
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries {tries};
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Hop:
    """One request as nginx logged it: the replicas tried, in order, and their statuses."""

    method: str
    path: str
    status: int
    upstreams: tuple[str, ...]
    upstream_status: tuple[str, ...]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """An nginx process balancing ``upstreams`` on a free loopback port."""

    def __init__(self, upstreams: Sequence[str], *, binary: Path | None = None, policy: str = "least_conn",
                 tries: int = 0) -> None:
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise RuntimeError("nginx is not installed: run `make served-test` (it runs apt-get install nginx)")
        self.upstreams = list(upstreams)
        self.policy = policy
        self.tries = tries
        self.folder = Path(tempfile.mkdtemp(prefix="oprm-nginx-"))
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    def start(self) -> "Nginx":
        conf = self.folder / "nginx.conf"
        conf.write_text(config(self.upstreams, self.port, self.folder, policy=self.policy, tries=self.tries))
        log = open(self.folder / "stderr.log", "ab")
        self.process = subprocess.Popen([str(self.binary), "-p", str(self.folder), "-c", str(conf), "-e",
                                         str(self.folder / "error.log")], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with code {self.process.returncode}: {self.errors()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not answer within 30 s: {self.errors()}")

    def errors(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            p = self.folder / name
            if p.is_file():
                out.append(p.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def hops(self) -> list[Hop]:
        """Every request logged so far (nginx writes a line when a request ends)."""
        if not self.access_log.is_file():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, rest = line.split(" ", 3)
            addr, ups = rest.split('" "')
            out.append(Hop(method, path, int(status), tuple(a.strip() for a in addr.strip('"').split(",")),
                           tuple(s.strip() for s in ups.strip('"').split(","))))
        return out

    def stop(self) -> None:
        proc, self.process = self.process, None
        stop_process(proc)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
