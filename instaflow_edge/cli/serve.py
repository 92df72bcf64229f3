"""``instaflow-edge serve SITE``: serve a ``convert --target web`` site on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import Terminated


def serve_command(
    site: Path = typer.Argument(..., help="Folder written by `instaflow-edge convert MODEL --target web -o SITE`."),
    port: int = typer.Option(8000, "--port", help="TCP port on 127.0.0.1 (0: any free port)."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not log each request."),
) -> None:
    """Serve a web site on 127.0.0.1 with the cross-origin isolation headers WASM threads need; Ctrl-C stops it."""
    from ..convert.web import site_server

    server = site_server(site, port, quiet=quiet)
    try:  # the line inside: a Ctrl-C right after it still stops cleanly
        typer.echo(f"serving {site} at http://127.0.0.1:{server.server_address[1]}/ (cross-origin isolated; Ctrl-C stops)", err=True)
        server.serve_forever()
    except Terminated:
        raise  # SIGTERM: the CLI reports it and exits 143, as every command does
    except KeyboardInterrupt:  # Ctrl-C: the normal way to stop
        typer.echo("stopped", err=True)
    finally:
        server.server_close()
