"""Profile chatproxy's hot path under the bench load with py-spy (installed by hand: it is no dependency).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py streams --level 32   # streaming: where the CPU goes per chunk
    .venv/bin/python bench/profile.py replies              # whole replies at one client: where the time goes

`streams` samples only threads holding the GIL (--gil: CPU spent in Python); `replies` samples wall time
of every active thread (waiting on SQLite's commit shows up). Prints the top functions, inclusive and
self, and keeps the collapsed stacks in bench/results/profile-<mode>.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path as FilePath

HERE = FilePath(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import scenarios  # noqa: E402
import stack  # noqa: E402
from load import CHATPROXY, Path, Slot  # noqa: E402

from chatproxy.callers import hash_token  # noqa: E402


def top(collapsed: FilePath, count: int = 30) -> str:
    """The functions with the most samples, inclusive and self, from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(encoding="utf-8").splitlines():
        frames, _, samples = line.rpartition(" ")
        if not frames or not samples.isdigit():
            continue
        names = [re.sub(r":\d+\)$", ")", f) for f in frames.split(";") if not f.startswith("process ")]
        total += int(samples)
        for name in set(names):
            inclusive[name] += int(samples)
        if names:
            own[names[-1]] += int(samples)
    lines = [f"{total} samples", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(count)]
    lines += ["self:"] + [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(count)]
    return "\n".join(lines)


async def load(mode: str, target: scenarios.Target, upstream: scenarios.Upstream, level: int, seconds: float) -> None:
    """Warm up, then the load to profile."""
    slot = Slot(target.path)
    for i in range(10):
        await slot.call(f"C-warm-{i}", 4, True)
        await slot.call(f"C-warmj-{i}", 16, False)
    slot.close()
    await asyncio.sleep(1.0)  # py-spy attaches
    if mode == "streams":
        print(await scenarios.sustained(target, upstream, level, 1.3, seconds - 1.3, target.server_pids()))
    else:
        print(await scenarios.json_rate(target, upstream, 1, seconds, 100000))


def main() -> int:
    """Start the upstream and gunicorn, load them, record with py-spy, print the top functions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("streams", "replies"))
    parser.add_argument("--level", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--worker-class", choices=("gthread", "gevent"), default="gthread")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(FilePath(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    out = HERE / "results" / f"profile-{args.mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = FilePath(tempfile.mkdtemp(prefix="chatproxy-profile-"))
    pin = stack.can_pin()
    upstream = stack.start_upstream(tmp, 0 if pin else None)
    app = stack.start_gunicorn(
        tmp,
        "C",
        stack.app_settings(tmp, upstream.port, hash_token(stack.TOKEN), CHATPROXY_WORKER_CLASS=args.worker_class),
        1 if pin else None,
    )
    try:
        target = scenarios.Target(Path("C", "gunicorn + chatproxy", app.port, CHATPROXY, stack.TOKEN), app.worker_pids)
        record = [
            spy,
            "record",
            "--pid",
            str(app.process.pid),
            "--subprocesses",
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "--duration",
            str(int(args.seconds)),
            "-o",
            str(out),
        ]
        if args.mode == "streams":
            record.append("--gil")
        recorder = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        asyncio.run(
            load(args.mode, target, scenarios.Upstream(upstream.port, upstream.process.pid), args.level, args.seconds)
        )
        recorder.wait(timeout=60)
    finally:
        app.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(top(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
