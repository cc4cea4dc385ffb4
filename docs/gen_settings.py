"""Rewrite .env.example and the README settings table from chatproxy.config.SETTINGS: `python docs/gen_settings.py`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatproxy.config import SETTINGS  # noqa: E402


def env_example() -> str:
    """The text of .env.example."""
    lines = ["# chatproxy settings. Copy to .env (never commit .env) or set them in your platform's secret store.",
             "# A real environment variable wins over this file. Values shown are the defaults.", ""]
    for setting in SETTINGS:
        lines.append(f"# {setting.help}")
        lines.append(f"{setting.name}={'' if setting.secret else setting.default}")
        lines.append("")
    return "\n".join(lines)


def readme_table() -> str:
    """The markdown settings table."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.name}` | {default} | {s.help.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> None:
    """Write both files."""
    (ROOT / ".env.example").write_text(env_example(), encoding="utf-8")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    text = re.sub(r"(<!-- settings:start -->\n).*?(<!-- settings:end -->)",
                  lambda m: m.group(1) + readme_table() + "\n" + m.group(2), text, flags=re.S)
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
