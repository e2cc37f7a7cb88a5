"""`pipeline serve`: the search API and page over HTTP (pipeline/serve/)."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import QUERY, UsageError, app, err_console, user_errors
from pipeline.errors import MissingExtra, pip_install


def allow_open_files() -> None:
    """Raise the open-file limit to the most allowed: a served index keeps each token shard
    open (its snapshot), two generations of them while one replaces the other."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here: a port in use is one line, before any index loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        # proto TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on TCP
        # sockets, and with it on, each answer after a connection's first waits ~40 ms.
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command(rich_help_panel=QUERY)
@user_errors
def serve(
    index: Annotated[list[Path] | None, typer.Option(
        "--index", "-i", metavar="FOLDER", help="Index folder to serve, asked for by its "
        "folder's name; repeat for more (the first is the default). Default: indexes/default.")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on; another than 127.0.0.1 "
                                      "lets other machines in.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        metavar="KEY", envvar="PIPELINE_API_KEY", show_envvar=True,
        help="Require `Authorization: Bearer KEY` on every route but /health and the page.")]
    = None,
    no_batching: Annotated[bool, typer.Option(
        "--no-batching", help="One request per forward pass (to compare).")] = False,
    cors_origin: Annotated[list[str] | None, typer.Option(
        metavar="ORIGIN", help="Origin whose web pages may call the API (repeat for more). "
        "Default: none.")] = None,
):
    """Serve search, embeddings and similarity over HTTP: a JSON API and a search page.

    Concurrent requests share forward passes. A rebuilt index folder is loaded again in the
    background (polled each second, or at once on SIGHUP) and swapped in whole; while a
    rebuild is writing the folder, searches are answered 503 with Retry-After.
    """
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"`pipeline serve` needs {' and '.join(missing)}: "
                           f"{pip_install('serve')}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key (or PIPELINE_API_KEY) is empty")
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, not {port}")
    import uvicorn

    from pipeline.serve.app import create_app

    allow_open_files()
    with listen(host, port) as sock:
        web = create_app(index or [Path("indexes/default")], api_key=api_key,
                         batching=not no_batching, cors_origins=cors_origin or ())
        where = f"[{host}]" if ":" in host else host
        err_console.print(f"serving {', '.join(web.state.service.slots)} on http://{where}:"
                          f"{port}/{' (API key required)' if api_key else ''}; Ctrl-C stops",
                          highlight=False)
        if not is_loopback(host) and not api_key:
            err_console.print(f"warning: {host} is reachable from other machines and no "
                              "--api-key is set", highlight=False)
        verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
        config = uvicorn.Config(web, host=host, port=port, access_log=verbose,
                                log_level="info" if verbose else "warning")
        uvicorn.Server(config).run(sockets=[sock])
