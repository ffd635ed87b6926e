"""Where Tandem keeps its local state, and the apiserver's token file in it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_FILE = "apiserver.token"


def default_data_dir() -> Path:
    """$TANDEM_HOME, else the user's data directory ($XDG_DATA_HOME or ~/.local/share)."""
    if os.environ.get("TANDEM_HOME"):
        return Path(os.environ["TANDEM_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "tandem"


def token_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / TOKEN_FILE


def load_or_create_token(path: Path) -> str:
    """The bearer token at `path`, created (mode 0600, never wider) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token file {path} is empty") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def read_token(path: Path) -> str | None:
    """The token if this host has one (the CLI on the apiserver's host needs no flag)."""
    if os.environ.get("TANDEM_TOKEN"):
        return os.environ["TANDEM_TOKEN"]
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
