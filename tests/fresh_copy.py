"""A copy of the project as a fresh clone has it (no .env, no instance/), with the test run's virtualenv as .venv.

Tests that run the README's commands for real use it, so nothing they do reads or writes this checkout's
.env or ledger, and a setting in the test runner's environment cannot leak into them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# No tests/: the product (`make run`, the command line, the offline demo) must run without it.
PARTS = ("chatproxy", "templates", "static", "devserver.py", ".env.example", "README.md", "pyproject.toml")
PREFIXES = ("OPENAI_", "CHATPROXY_", "AZURE_", "FLASK_", "PYTHON")


def fresh_copy(dest: Path) -> Path:
    """Copy the project's runtime files to `dest` and link `.venv` to this interpreter's environment."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    (dest / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any chatproxy, OpenAI, Flask or Python setting, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(PREFIXES)}
    env.update(extra)
    return env


def run(root: Path, args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command in the copy, as a user would type it there."""
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
