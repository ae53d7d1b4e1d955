"""``immune pki``: the certificates of mutual TLS, and the command key.

Thin commands over :mod:`immune.pki`; errors are :class:`ImmuneError` and
become one red line at the CLI boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from immune import pki

app = typer.Typer(
    help="Make the CA and the certificates of mutual TLS, and the command key.",
    no_args_is_help=True,
)
console = Console()

Directory = Annotated[
    Path, typer.Option("--dir", "-d", help="Where the CA and certificates live.")
]


def _said(*paths: Path) -> None:
    for path in paths:
        console.print(f"Wrote {escape(str(path))}")


@app.command("ca")
def ca(
    directory: Directory = Path("pki"),
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "IMMUNE CA",
) -> None:
    """Create the certificate authority (ca.pem, ca.key)."""
    cert = pki.create_ca(directory, name)
    _said(cert, directory / pki.CA_KEY)


@app.command("broker")
def broker(
    directory: Directory = Path("pki"),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A name or address agents use to reach it."),
    ] = None,
) -> None:
    """Issue the broker's server certificate (broker.pem, broker.key)."""
    names = host or ["localhost", "127.0.0.1"]
    _said(*pki.issue(directory, names[0], server_names=names, basename="broker"))


@app.command("hive")
def hive(directory: Directory = Path("pki")) -> None:
    """Issue the hive's client certificate (hive.pem, hive.key)."""
    _said(*pki.issue(directory, pki.HIVE_NAME, basename="hive"))


@app.command("agent")
def agent(
    agent_id: Annotated[str, typer.Argument(help="The agent's id ([agent] id).")],
    directory: Directory = Path("pki"),
) -> None:
    """Issue an agent's client certificate (agent-<id>.pem, .key)."""
    _said(*pki.issue_agent(directory, agent_id))


@app.command("client")
def client(
    name: Annotated[
        str, typer.Argument(help="Its common name, e.g. immune-integrator.")
    ],
    directory: Directory = Path("pki"),
) -> None:
    """Issue another client's certificate (<name>.pem, .key), e.g. an
    integrator reading alerts."""
    _said(*pki.issue(directory, name))


@app.command("command-key")
def command_key(
    key: Annotated[
        Path | None,
        typer.Option(help="The hive's command key ([hive] command_key)."),
    ] = None,
    public: Annotated[
        Path, typer.Option(help="Where to write the public key for agents.")
    ] = Path("command.pub"),
) -> None:
    """Make (if missing) the hive's command signing key; export its public key."""
    from immune import signing
    from immune.config import state_dir

    path = key or state_dir() / "command.key"
    public.write_bytes(signing.public_pem(signing.load_or_create_key(path)))
    console.print(f"Command key {escape(str(path))}; public key for agents:")
    _said(public)
