"""`python -m chatproxy batch submit|status|results`: the Batch API from the server's shell, as cli:local.

The commands call the same functions as the HTTP routes, so a batch from the shell is validated,
budgeted and recorded like one from a token holder. Human messages go to stderr and data to
stdout, so `ID=$(python -m chatproxy batch submit prompts.csv)` works. In the offline demo the
demo upstream lives in this process and forgets its batches when the command ends, so `submit`
waits for the batch and writes its results itself.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from flask.cli import AppGroup

from ..errors import ApiError
from ..state import state
from ..strict import check_strict
from . import service as batch

batch_group = AppGroup("batch", help="Run requests through the Batch API at half price (as identity cli:local).")

CSV_COLUMNS = ("custom_id", "message", "model", "max_tokens")
POLL_SECONDS, DEMO_POLL_SECONDS = 10.0, 1.0  # the demo upstream finishes a batch in about 3 s
DEMO_HINT = " (offline demo: a batch lives only while the `batch submit` that made it runs)"


def read_items(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The request items of a JSONL or CSV file, and each item's line number in the file."""
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    return _csv_items(path, text) if fmt == "csv" else _jsonl_items(path, text)


def _jsonl_items(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    items, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise click.ClickException(f"{path.name} line {number} is not valid JSON.") from None
        try:
            check_strict(item)  # as the HTTP routes' parse_json_body does: NaN, 1e400, lone surrogates
        except ApiError as exc:
            raise click.ClickException(f"{path.name} line {number}: {exc.message}") from None
        items.append(item)
        numbers.append(number)
    return items, numbers


def _csv_items(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if "custom_id" not in columns or "message" not in columns or not set(columns) <= set(CSV_COLUMNS):
        raise click.ClickException(
            f"{path.name} needs a header row with custom_id,message and optionally "
            f"model,max_tokens; it has {','.join(columns) or 'none'}."
        )
    items, numbers = [], []
    for row in reader:
        if None in row:
            raise click.ClickException(f"{path.name} line {reader.line_num} has more cells than the header.")
        item: dict[str, Any] = {key: value for key, value in row.items() if value not in (None, "")}
        if "max_tokens" in item:
            try:
                item["max_tokens"] = int(item["max_tokens"])
            except ValueError:
                raise click.ClickException(
                    f"{path.name} line {reader.line_num}: max_tokens must be an integer."
                ) from None
        items.append(item)
        numbers.append(reader.line_num)
    return items, numbers


def _demo() -> bool:
    """Whether this command's upstream is the in-process offline demo."""
    return state().settings.demo


def _api(call: Any, *args: Any) -> Any:
    """Run a batch function; its contract errors become a one-line CLI error."""
    try:
        return call(*args)
    except ApiError as exc:
        hint = DEMO_HINT if _demo() and exc.code.startswith("upstream_") else ""
        raise click.ClickException(f"{exc.code}: {exc.message}{hint}") from None


def _poll(given: float | None) -> float:
    return given if given is not None else DEMO_POLL_SECONDS if _demo() else POLL_SECONDS


def wait(batch_id: str, poll: float | None) -> dict[str, Any]:
    """Poll until the batch has finished, with a progress bar on stderr; its final view."""
    poll = _poll(poll)
    view = _api(batch.status, batch_id, batch.CLI_IDENTITY)
    shown = 0
    with click.progressbar(
        length=view["request_counts"]["total"], label=batch_id, show_pos=True, file=sys.stderr
    ) as bar:
        while True:
            counts = view["request_counts"]
            done = counts["completed"] + counts["failed"]
            bar.update(done - shown)
            shown = done
            if view["status"] in batch.FINISHED:
                return view
            time.sleep(poll)
            try:
                view = batch.status(batch_id, batch.CLI_IDENTITY)
            except ApiError as exc:
                if exc.status < 500:
                    raise click.ClickException(f"{exc.code}: {exc.message}") from None
                click.echo(f"\n{exc.code}: {exc.message} (still waiting)", err=True)


def write_results(batch_id: str, output: Path | None) -> None:
    """Fetch the results (recording them in the ledger the first time) and write them as JSONL."""
    answer = _api(batch.results, batch_id, batch.CLI_IDENTITY)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in answer["results"])
    failed = sum(1 for line in answer["results"] if "error" in line)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
    click.echo(
        f"{len(answer['results'])} results ({failed} failed) of batch {batch_id} ({answer['status']})"
        + (f" written to {output}" if output else ""),
        err=True,
    )


def _summary(view: dict[str, Any]) -> str:
    counts = view["request_counts"]
    return (
        f"{view['id']}  {view['status']}  {counts['completed'] + counts['failed']}/{counts['total']} done, "
        f"{counts['failed']} failed  ({view['model']}, created {view['created_at']})"
    )


@batch_group.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "jsonl", "csv"]),
    default="auto",
    show_default=True,
    help="auto: CSV for *.csv (columns custom_id,message[,model][,max_tokens]), else JSONL of API items.",
)
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish, showing progress.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --wait: write the results to this JSONL file.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.01),
    help=f"Seconds between status checks while waiting [default: {POLL_SECONDS:g}; "
    f"{DEMO_POLL_SECONDS:g} in the offline demo].",
)
def submit_command(file: Path, fmt: str, wait_: bool, output: Path | None, poll: float | None) -> None:
    """Submit FILE as one batch; print its id. In the offline demo, wait and write the results too."""
    demo = _demo()
    if output is not None and not wait_ and not demo:
        raise click.UsageError("-o/--output needs --wait (or use `batch results ID -o FILE` later).")
    items, numbers = read_items(file, fmt)
    lines = _api(
        batch.parse_requests,
        {"requests": items},
        lambda index: f"{file.name} line {numbers[index]}",
    )
    view = _api(batch.submit, lines, batch.CLI_IDENTITY)
    click.echo(view["id"])
    click.echo(f"Submitted {len(lines)} requests as batch {view['id']} ({view['status']}).", err=True)
    if demo and not (wait_ and output is not None):
        click.echo(
            "Offline demo: the demo upstream ends with this command, so it waits for the batch and "
            f"writes its results to {output or 'stdout'}.",
            err=True,
        )
    if wait_ or demo:
        view = wait(view["id"], poll)
        click.echo(_summary(view), err=True)
        if output is not None or demo:
            write_results(view["id"], output)


@batch_group.command("status")
@click.argument("batch_id")
def status_command(batch_id: str) -> None:
    """Print a batch's status and progress."""
    click.echo(_summary(_api(batch.status, batch_id, batch.CLI_IDENTITY)))


@batch_group.command("results")
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results to this JSONL file (default: stdout).",
)
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to finish first, showing progress.")
@click.option(
    "--poll",
    type=click.FloatRange(min=0.01),
    help=f"Seconds between status checks while waiting [default: {POLL_SECONDS:g}; "
    f"{DEMO_POLL_SECONDS:g} in the offline demo].",
)
def results_command(batch_id: str, output: Path | None, wait_: bool, poll: float | None) -> None:
    """Write a finished batch's results as JSONL: {custom_id, content} or {custom_id, error}."""
    if wait_:
        wait(batch_id, poll)
    write_results(batch_id, output)
