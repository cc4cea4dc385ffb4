"""Rewrite .env.example and the README settings table from chatproxy.config.SETTINGS: `python docs/gen_settings.py`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatproxy.config import SETTINGS  # noqa: E402

FILL_IN = frozenset({"OPENAI_API_KEY"})  # the one line the README's quick start asks you to fill in


def env_example() -> str:
    """The text of .env.example: OPENAI_API_KEY to fill in, every other setting commented out at its default.

    Copied to .env, it sets nothing but the key: `make run` still decides what a setting left out means
    (anonymous calls on loopback), and a later change of a default reaches existing .env files.
    """
    lines = [
        "# chatproxy settings. Copy to .env (never commit .env) or set them in your platform's secret store.",
        "# A real environment variable wins over this file. Each line shows the default: uncomment it to",
        "# change the value. Settings are read at start-up: restart `make run` after editing this file.",
        "",
    ]
    for setting in SETTINGS:
        lines.append(f"# {setting.help}")
        value = "" if setting.secret else setting.default
        lines.append(f"{setting.name}={value}" if setting.name in FILL_IN else f"# {setting.name}={value}")
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
    text = re.sub(
        r"(<!-- settings:start -->\n).*?(<!-- settings:end -->)",
        lambda m: m.group(1) + readme_table() + "\n" + m.group(2),
        text,
        flags=re.S,
    )
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
