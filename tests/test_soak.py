"""The soak's quick mode in the suite: 4 gunicorn workers, 50 clients, a flaky upstream, Redis and PostgreSQL
stopped and restarted under load (private instances: nobody else's tests are disturbed). `make soak` is the
full run that writes docs/RELIABILITY.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_soak_loses_nothing_and_no_worker_dies(tmp_path):
    output = tmp_path / "soak.json"

    done = subprocess.run(
        [sys.executable, "tests/soak.py", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    report = json.loads(output.read_text())
    failed = [f"{name}: {detail}" for name, ok, detail in report["checks"] if not ok]
    assert done.returncode == 0 and report["ok"] and not failed, "\n".join(failed) or done.stdout[-3000:]
    names = " ".join(name for name, _, _ in report["checks"])
    for expected in (
        "one ledger row per upstream call",
        "token sums equal",
        "no worker died",
        "memory growth",
        "Redis down",
        "PostgreSQL down",
        "went unrecorded",
        "nothing recorded before",
    ):
        assert expected in names, expected
