"""nginx running deploy/nginx.conf's upstream and proxy regions on loopback, without TLS (deploy tests, bench)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def region(text: str, name: str) -> str:
    """The lines between `# >>> name` and `# <<< name` in deploy/nginx.conf."""
    return re.search(rf"# >>> {name}\n(.*?)# <<< {name}", text, re.S).group(1)


def write_conf(
    prefix: Path,
    backend_port: int,
    port: int,
    *,
    connections: int = 256,
    backlog: int | None = None,
    error_level: str = "info",
    open_files: int | None = None,
) -> Path:
    """An nginx.conf under `prefix` (with its temp folders) listening on `port`, proxying to `backend_port`."""
    site = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    temp = {kind: prefix / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
{f"worker_rlimit_nofile {open_files};" if open_files else ""}
error_log {prefix}/error.log {error_level};
events {{ worker_connections {connections}; }}
http {{
    access_log {prefix}/access.log;
    default_type application/octet-stream;
    {" ".join(f"{kind}_temp_path {path};" for kind, path in temp.items())}
    {region(site, "http").replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{backend_port};")}
    server {{
        listen 127.0.0.1:{port}{f" backlog={backlog}" if backlog else ""};
        server_name localhost;
        {region(site, "proxy")}
    }}
}}
""",
        encoding="utf-8",
    )
    return conf


def argv(prefix: Path, conf: Path) -> list[str]:
    """The command that runs nginx in the foreground with `conf`."""
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-g", f"daemon off; pid {prefix}/nginx.pid;"]
