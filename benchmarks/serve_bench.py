"""`pipeline serve` on loopback: searches/s and p50/p99 latency at concurrency 1, 8 and 64,
batching on and off in the same run, beside one `pipeline search` process per query (what
scripts did before the server); and /embed texts/s.

    python benchmarks/serve_bench.py [--index indexes/default] [--requests 512] [--seconds 15]

Each mode gets a fresh server (`pipeline serve`, a second process, on a free port of
127.0.0.1), warmed up with a few requests. Each level sends at most --requests requests and
stops starting new ones after --seconds. The client is a few lines of HTTP/1.1 over asyncio
streams, one keep-alive connection per concurrent caller: a full client library costs more
CPU per request than the server's own work, and on a small machine the two share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [
    "tool to resize photos", "python library for parsing xml", "web server with reverse proxy",
    "fonts for asian languages", "music player for the terminal", "compress files into zip",
    "text editor with syntax highlighting", "database with sql queries", "network time daemon",
    "perl module for http requests", "javascript engine", "haskell web framework",
    "game with 3d graphics", "pdf viewer", "backup tool with encryption", "email client",
    "spell checking dictionary", "video encoder", "firewall configuration", "ssh server",
    "image manipulation programs", "library for json in c", "ruby testing framework",
    "documentation generator", "scientific plotting", "audio editor", "chess engine",
    "kernel module for wireless cards", "password manager", "markdown to html converter",
    "static site generator", "monitoring system for servers",
]
LEVELS = (1, 8, 64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, batching: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [sys.executable, "-m", "pipeline.cli", "serve", "--index", str(index), "--port",
            str(port), *([] if batching else ["--no-batching"])]
    server = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"the server did not start: {' '.join(args)}")


async def call(reader, writer, method: str, path: str, body: bytes = b"") -> int:
    """One request on a kept-alive connection; its status (the body is read and dropped)."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if body else "") + "\r\n")
    writer.write(head.encode() + body)
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def load(port: int, requests: list[tuple[str, str, bytes]], concurrency: int,
               seconds: float) -> tuple[list[float], float, int]:
    """Send `requests` from `concurrency` callers; (latencies of those answered 200, wall
    seconds, how many were not 200)."""
    latencies, failed, pending = [], 0, iter(requests)
    deadline = time.perf_counter() + seconds

    async def caller():
        nonlocal failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for method, path, body in pending:
            start = time.perf_counter()
            status = await call(reader, writer, method, path, body)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failed += 1
            if time.perf_counter() > deadline:
                break
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, failed


def searches(n: int) -> list[tuple[str, str, bytes]]:
    return [("GET", f"/search?q={quote(QUERIES[i % len(QUERIES)])}&k=10", b"")
            for i in range(n)]


def embeds(n: int) -> list[tuple[str, str, bytes]]:
    return [("POST", "/embed", json.dumps({"input": QUERIES[i % len(QUERIES)]}).encode())
            for i in range(n)]


def row(mode: str, what: str, concurrency: int, result) -> dict:
    latencies, wall, failed = result
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    return {"mode": mode, "what": what, "concurrency": concurrency, "answered": len(latencies),
            "failed": failed, "per_s": len(latencies) / wall, "p50_ms": ms[len(ms) // 2],
            "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))]}


def bench_mode(index: Path, batching: bool, count: int, seconds: float) -> list[dict]:
    mode = "batching" if batching else "no batching"
    server, port = start_server(index, batching)
    try:
        asyncio.run(load(port, searches(16) + embeds(16), 4, seconds))  # warm up
        rows = [row(mode, "search", c, asyncio.run(load(port, searches(count), c, seconds)))
                for c in LEVELS]
        rows += [row(mode, "embed", c, asyncio.run(load(port, embeds(count), c, seconds)))
                 for c in (1, 64)]
    finally:
        server.terminate()
        server.wait(30)
    return rows


def process_per_query(index: Path, n: int) -> dict:
    """The baseline: `pipeline search QUERY` once per query, a process each."""
    times = []
    for query in QUERIES[:n]:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "search", query, "--index",
                        str(index), "-k", "10", "--json"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return row("process per query", "search", 1, (times, sum(times), 0))


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':<18} {'what':<7} {'conc':>4} {'answered':>8} {'failed':>6} {'per s':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['mode']:<18} {r['what']:<7} {r['concurrency']:>4} {r['answered']:>8} "
              f"{r['failed']:>6} {r['per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")


def print_ratios(rows: list[dict]) -> None:
    by = {(r["mode"], r["what"], r["concurrency"]): r for r in rows}
    for what, levels in (("search", LEVELS), ("embed", (1, 64))):
        for c in levels:
            on, off = by[("batching", what, c)], by[("no batching", what, c)]
            print(f"{what} at concurrency {c}: batching {on['per_s'] / off['per_s']:.2f}x the "
                  f"throughput of no batching, p99 {on['p99_ms'] / off['p99_ms']:.2f}x")
    base = by[("process per query", "search", 1)]
    for c in LEVELS:
        served = by[("batching", "search", c)]
        print(f"server (batching) at concurrency {c}: {served['per_s'] / base['per_s']:.0f}x "
              f"the searches/s of a process per query ({base['per_s']:.2f}/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=ROOT / "indexes" / "default")
    parser.add_argument("--requests", type=int, default=512, help="at most, per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="at most, per level")
    parser.add_argument("--processes", type=int, default=3,
                        help="queries for the process-per-query baseline")
    args = parser.parse_args()
    if not (args.index / "index.json").is_file():
        sys.exit(f"{args.index} has no index: build one first (make index)")
    rows = [*bench_mode(args.index, True, args.requests, args.seconds),
            *bench_mode(args.index, False, args.requests, args.seconds),
            process_per_query(args.index, args.processes)]
    print_table(rows)
    print()
    print_ratios(rows)


if __name__ == "__main__":
    main()
