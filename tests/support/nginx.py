"""Debian's real nginx in front of a test registry, as users put one (TLS, Basic auth, limits).

The configuration follows the CNCF distribution docs' nginx recipe
(https://distribution.github.io/distribution/recipes/nginx/): TLS terminated by nginx with a
private CA, ``auth_basic`` against an htpasswd file, ``chunked_transfer_encoding on``, the
``Docker-Distribution-Api-Version`` header added, ``Host`` and ``X-Forwarded-Proto`` passed on
so the registry writes upload ``Location`` URLs that point back at nginx. The recipe disables
the body limit (``client_max_body_size 0``); here it is a parameter, by default nginx's own
default of ``1m``, which is what users who skip that line get (HTTP 413 on any request body
over 1 MiB).

Everything (config, pid, logs, temp directories) lives under one directory; nginx runs in the
foreground (``daemon off``) on a free loopback port.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from tests.support.process import tail_log, terminate
from tests.support.registry import Registry, free_port, make_tls_files

# 127.0.0.1 - robot [06/Dec/2026:08:30:00 +0000] "PATCH /v2/... HTTP/1.1" 413 183 0
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ (?P<user>\S+) \[[^\]]+\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]+" '
    r"(?P<status>\d{3}) \d+ (?P<length>\d+|-)$"
)


class NginxError(AssertionError):
    """nginx did not start, or its configuration was refused."""


def ssha_entry(user: str, password: str) -> str:
    """An htpasswd line in the ``{SSHA}`` scheme, which nginx's ``auth_basic`` reads itself."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return f"{user}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n"


class Nginx:
    """nginx proxying ``https://127.0.0.1:<port>/v2/`` to ``upstream`` (a plain-HTTP registry).

    ``users`` are the Basic-auth accounts nginx checks; ``client_max_body_size`` is nginx's
    body limit (``"0"`` disables it). :meth:`requests` reads the access log: method, path,
    status and request length of every request nginx answered, 413s included.
    """

    def __init__(
        self,
        base_dir: Path,
        upstream: Registry,
        *,
        users: Mapping[str, str],
        client_max_body_size: str = "1m",
    ) -> None:
        self.base_dir = base_dir
        self.upstream = upstream
        self.users = dict(users)
        self.client_max_body_size = client_max_body_size
        self.port = free_port()
        self._tls_dir = base_dir / "tls"
        self.cert_dir = base_dir / "certs"
        self.config_path = base_dir / "nginx.conf"
        self.error_log = base_dir / "error.log"
        self.access_log = base_dir / "access.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the registry host users push to."""
        return f"127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The private CA that signed nginx's certificate."""
        return self.cert_dir / "ca.crt"

    def config(self) -> str:
        """nginx.conf, after the distribution docs' recipe (see the module docstring)."""
        base = os.fspath(self.base_dir)
        upstream = self.upstream.host
        # As root, nginx's workers would be www-data, who cannot read the test's private dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""\
{user}worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    log_format registry '$remote_addr - $remote_user [$time_local] "$request" '
                        '$status $body_bytes_sent $content_length';
    access_log {self.access_log} registry;
    upstream docker-registry {{ server {upstream}; }}
    map $upstream_http_docker_distribution_api_version $docker_distribution_api_version {{
        '' 'registry/2.0';
    }}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self._tls_dir}/server.crt;
        ssl_certificate_key {self._tls_dir}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {self.client_max_body_size};
        chunked_transfer_encoding on;
        location /v2/ {{
            auth_basic "Registry realm";
            auth_basic_user_file {base}/htpasswd;
            add_header 'Docker-Distribution-Api-Version' $docker_distribution_api_version always;
            proxy_pass http://docker-registry;
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 900;
        }}
    }}
}}
"""

    def start(self) -> Self:
        """Write the config, certificates and htpasswd; start nginx; wait for ``/v2/``."""
        binary = shutil.which("nginx")
        if binary is None:
            raise NginxError("nginx not found: install the Debian package nginx")
        (self.base_dir / "tmp").mkdir(parents=True, exist_ok=True)
        make_tls_files(self._tls_dir)
        self.cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(self._tls_dir / "ca.crt", self.ca_file)
        (self.base_dir / "htpasswd").write_text(
            "".join(ssha_entry(u, p) for u, p in self.users.items())
        )
        self.config_path.write_text(self.config())
        self._out = (self.base_dir / "stderr.log").open("ab")
        self._proc = subprocess.Popen(
            [binary, "-c", os.fspath(self.config_path), "-p", os.fspath(self.base_dir)],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(20.0)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        context = ssl.create_default_context(cafile=os.fspath(self.ca_file))
        with httpx.Client(verify=context, timeout=2.0) as client:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    raise NginxError(f"nginx exited on start:\n{self.log_tail()}")
                try:
                    if client.get(f"https://{self.host}/v2/").status_code == 401:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise NginxError(f"nginx not ready after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.05)

    def log_tail(self) -> str:
        """The end of nginx's error log and its own output."""
        return tail_log(self.error_log) + "\n" + tail_log(self.base_dir / "stderr.log")

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, request Content-Length) of each request, in order."""
        if not self.access_log.exists():
            return []
        found = []
        for line in self.access_log.read_text().splitlines():
            m = _ACCESS_LINE.match(line)
            if m is not None:
                length = 0 if m["length"] == "-" else int(m["length"])
                found.append((m["method"], m["uri"].split("?")[0], int(m["status"]), length))
        return found

    def stop(self) -> None:
        """Stop nginx (SIGTERM: fast shutdown)."""
        if self._proc is not None:
            terminate(self._proc, 10.0)
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
