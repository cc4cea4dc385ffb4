"""The ledger's report for people: the `usage` command as text or JSON, an SVG chart, the dates a report takes."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import click
from flask.cli import with_appcontext

from .errors import invalid
from .state import state
from .usage import default_range, key_of, usd

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


# The days a report can reach: its end plus one day, and a default start 29 days before its end, stay dates.
FIRST_DAY = date.min + timedelta(days=29)
LAST_DAY = date.max - timedelta(days=1)


def parse_day(value: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query parameter from FIRST_DAY to LAST_DAY, or a 400 naming it."""
    if value is None or value == "":
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise invalid(f"{name} must be a date as YYYY-MM-DD.") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise invalid(f"{name} must be a day from {FIRST_DAY} to {LAST_DAY}.")
    return day


@click.command("usage")
@with_appcontext
@click.option(
    "--since", type=click.DateTime(["%Y-%m-%d"]), help="First UTC day, YYYY-MM-DD (default: 29 days before --until)."
)
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last UTC day, YYYY-MM-DD (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write an SVG chart of spend per day by model.")
def usage_command(since: datetime | None, until: datetime | None, as_json: bool, plot: str | None) -> None:
    """Requests, tokens and spend per day, model and identity."""
    for name, value in (("--since", since), ("--until", until)):
        if value is not None and not FIRST_DAY <= value.date() <= LAST_DAY:
            raise click.BadParameter(f"must be a day from {FIRST_DAY} to {LAST_DAY}.", param_hint=name)
    first, last = default_range(since.date() if since else None, until.date() if until else None)
    if first > last:
        raise click.BadParameter("--since must not be after --until.")
    report = state().ledger.report(first, last)
    click.echo(json.dumps(report, indent=2) if as_json else text_report(report))
    if plot:
        Path(plot).write_text(spend_chart_svg(report), encoding="utf-8")
        click.echo(f"Wrote the chart to {plot}", err=True)


def text_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    totals = report["totals"]
    lines = [
        f"Usage {report['since']} .. {report['until']} (UTC)",
        f"Total: {totals['requests']} requests, {totals['prompt_tokens']} prompt ({totals['cached_tokens']} cached) + "
        f"{totals['completion_tokens']} completion ({totals['reasoning_tokens']} reasoning) tokens, "
        f"${totals['cost_usd']}",
    ]
    if report["outcomes"]:
        lines.append("Outcomes: " + ", ".join(f"{name} {count}" for name, count in report["outcomes"].items()))
    if not report["groups"]:
        lines.append("No usage in this range.")
        return "\n".join(lines)
    for title, name, entries in (("key", "key", report["by_key"]), ("end user", "identity", report["by_end_user"])):
        if entries:
            lines.append(f"By {title}: " + ", ".join(f"{e[name]} ${e['cost_usd']} ({e['requests']})" for e in entries))
    header = ("day", "model", "identity", "requests", "prompt", "cached", "completion", "reasoning", "USD")
    rows = [
        (
            g["day"],
            g["model"],
            g["identity"],
            str(g["requests"]),
            str(g["prompt_tokens"]),
            str(g["cached_tokens"]),
            str(g["completion_tokens"]),
            str(g["reasoning_tokens"]),
            g["cost_usd"],
        )
        for g in report["groups"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def spend_chart_svg(report: dict[str, Any], by: str = "model") -> str:
    """Stacked bars of spend per UTC day, one colour per model (or per API key), as a standalone SVG document."""
    since, until = date.fromisoformat(report["since"]), date.fromisoformat(report["until"])
    days = [since + timedelta(days=i) for i in range((until - since).days + 1)]
    series = (lambda g: key_of(g["identity"])) if by == "key" else (lambda g: g["model"])
    models = sorted({series(g) for g in report["groups"]})
    spend: dict[tuple[str, str], int] = {}
    for group in report["groups"]:
        key = (group["day"], series(group))
        spend[key] = spend.get(key, 0) + group["cost_micros"]
    day_totals = [sum(spend.get((d.isoformat(), m), 0) for m in models) for d in days]
    top = _nice_ceiling(max(day_totals, default=0))

    left, right, top_pad, bottom = 80, 20 + 160, 40, 50
    plot_w = min(1200, max(300, len(days) * 24))
    slot = plot_w / len(days)
    bar, gap = slot * 0.75, slot * 0.25
    plot_h = 240
    width, height = left + plot_w + right, top_pad + plot_h + bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">',
        f"<title>Spend per day by {by}, {escape(report['since'])} to {escape(report['until'])} (USD)</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="22" font-size="14">Spend per day by {by} (USD), '
        f"{escape(report['since'])} to {escape(report['until'])}</text>",
    ]
    for i in range(5):  # gridlines and y labels at 0, 25, 50, 75, 100 %
        value = top * i // 4
        y = top_pad + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#dddddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">${_short_usd(value)}</text>')
    step = -(-len(days) // 10)  # at most 10 date labels
    for i, day in enumerate(days):
        x = left + i * (bar + gap) + gap / 2
        base = top_pad + plot_h
        for m_index, model in enumerate(models):
            micros = spend.get((day.isoformat(), model), 0)
            if not micros:
                continue
            h = plot_h * micros / top
            base -= h
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{COLORS[m_index % len(COLORS)]}" data-model={quoteattr(model)} '
                f'data-day="{day.isoformat()}"><title>{escape(f"{day} {model}: ${usd(micros)}")}'
                f"</title></rect>"
            )
        if i % step == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{top_pad + plot_h + 16}" text-anchor="middle">'
                f"{day.strftime('%m-%d')}</text>"
            )
    out.append(
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#333333"/>'
    )
    if not models:
        out.append(
            f'<text x="{left + plot_w / 2}" y="{top_pad + plot_h / 2}" text-anchor="middle">'
            f"No spend in this range</text>"
        )
    for m_index, model in enumerate(models):  # legend
        y = top_pad + m_index * 18
        out.append(
            f'<rect x="{left + plot_w + 20}" y="{y}" width="12" height="12" fill="{COLORS[m_index % len(COLORS)]}"/>'
        )
        out.append(f'<text x="{left + plot_w + 38}" y="{y + 10}">{escape(model)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice_ceiling(micros: int) -> int:
    """The smallest 1, 2 or 5 × 10^k micro-dollars (×4 for even gridlines) at or above `micros`; at least 4."""
    if micros <= 0:
        return 4
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale * 4 >= micros:
                return step * scale * 4
        scale *= 10


def _short_usd(micros: int) -> str:
    """A compact dollar label: trailing zeros removed, at most six decimals."""
    text = usd(micros).rstrip("0").rstrip(".")
    return text or "0"
