"""What every API command shares: --apiserver, --json, one-line errors."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from maya.client import ApiClient, ApiError

console = Console(highlight=False)


def api_command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --apiserver and --json, passes `api` and `as_json`, turns API errors into
    one clear line on stderr and exit status 1."""

    @click.option(
        "--apiserver",
        envvar="TANDEM_APISERVER",
        default=None,
        help="The apiserver's URL [default: $TANDEM_APISERVER or http://127.0.0.1:5656].",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @functools.wraps(f)
    def wrapper(apiserver: str | None, as_json: bool, **kw: Any) -> Any:
        try:
            return f(api=ApiClient(apiserver), as_json=as_json, **kw)
        except ApiError as e:
            raise click.ClickException(e.detail) from None
        except ValueError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
