"""The benchmark harness runs end to end: `bench/run.py --quick` against the direct path (A), gunicorn + app (C), the
app's /v1/chat/completions (V) and the plain Flask + SDK proxy (F), then bench/cost.py (the app in-process, profiled).

Speed is measured by `make bench`, never asserted here: these checks hold on a slow or busy machine too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "gap_p50_ms",
    "gap_p99_ms",
    "gap_max_ms",
    "lag_p50_ms",
    "lag_p99_ms",
    "json_p50_ms",
    "json_p99_ms",
    "added_ttft_p50_ms",
    "added_gap_p99_ms",
    "added_json_p50_ms",
)


def test_quick_bench_writes_a_well_formed_result(tmp_path):
    run = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--paths", "A,C,V,F", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(results["figures"]) == {"A", "C", "V", "F"}
    for letter, figures in results["figures"].items():
        assert all(isinstance(figures[key], (int, float)) for key in NUMBERS), (letter, figures)
        # What the client received is byte-for-byte what the upstream sent, one delta per upstream chunk.
        assert figures["identical"] is True and figures["chunks"] == [64] and figures["errors"] == [], figures
        assert figures["sustained_top_measured"] == 2
        assert figures["chunks_after_abort_max"] is not None
        assert {point["level"] for point in results["sustained"][letter]} == {2}
    app = results["figures"]["C"]
    assert app["cpu_ms_per_1000_chunks"] > 0 and app["kib_per_stream"] is not None and app["threads_at_level"] > 0
    # Streams hand their upstream connection back when they end: at most one new one per gunicorn worker.
    assert results["reuse"]["one_client"]["C"]["connections"] <= 2, results["reuse"]
    assert results["server_log_problems"] == {}
    report = (tmp_path / "BENCHMARKS.md").read_text(encoding="utf-8")
    for heading in (
        "## Machine and run",
        "## Goals",
        "## 1. Time to first token",
        "## 2. Between chunks",
        "## 3. Sustained streams",
        "## 4. Whole (non-streaming) replies",
        "## 5. Memory, CPU and threads",
        "## 6. Upstream connections and hang-ups",
        "## Ratios",
        "## 7. Where the CPU goes",
    ):
        assert heading in report
    # bench/cost.py ran (in-process CPU per request and per chunk, the profile by layer) and its section renders.
    cost = results["cost"]
    assert cost is not None, results["notes"]
    assert cost["cpu"]["default"]["request_ms"] > 0 and cost["cpu"]["no_keepalive"]["stream_ms"] > 0, cost["cpu"]
    assert cost["layers"]["python_calls_per_request"] > 0 and cost["layers"]["python_calls_per_chunk"] > 0
    assert "**The floor.** Of " in report and "**What cannot be removed in Python**" in report
    # CPU and memory are compared at one level, named in the Goals.
    assert "≤ 80 ms CPU per 1,000 chunks at 2 streams" in report
