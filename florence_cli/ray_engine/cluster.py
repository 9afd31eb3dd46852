"""Joining a Ray cluster (or starting Ray on this machine) with the machine's auth token, and saying in
one line why a join failed."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray
import ray.exceptions

from ..engine import EngineError


class RayEngineError(EngineError):
    """The Ray job cannot run as asked; the message is one line for the user."""


def join(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto`` or HOST:PORT), or start Ray here when None; whether this
    call started Ray (``leave`` ends it then). ``RayEngineError`` names why a join failed."""
    if ray.is_initialized():
        return False
    local = {} if address else {"include_dashboard": False}
    try:
        _check_reachable(address)
        if address:
            _present_token_at_hand()
        ray.init(address=address or "local", logging_level=logging.ERROR, **local)
    except (OSError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
        raise RayEngineError(_cannot_join(address, exc)) from None
    return True


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each node that is alive."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def leave() -> None:
    ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (``ray.init`` retries for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=10).close()


_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token (the head node's ~/.ray/auth_token), or copy that file here"
)


def _present_token_at_hand() -> None:
    """Join with this machine's Ray auth token, if it has one. Ray 2.60 sends it by itself only to
    ``auto``; yet ``ray start`` turns token authentication on wherever a token exists (any local Ray
    run writes ``~/.ray/auth_token``), and a cluster without it ignores one. ``RAY_AUTH_MODE`` set by
    the user is obeyed."""
    from ray._private.authentication import authentication_token_setup as auth

    logging.getLogger(auth.__name__).setLevel(logging.ERROR)  # not its note that the cluster uses tokens
    auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _token_source() -> str | None:
    """Where this machine's Ray auth token is, looked for in Ray's order; None: nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return str(path) if path.read_text(encoding="utf-8").strip() else None
    except (OSError, UnicodeDecodeError):
        return None


def _cannot_join(address: str | None, exc: BaseException) -> str:
    """Why joining failed, in one line; a token the cluster refused or wants is named as the cause."""
    causes: list[BaseException] = []
    while exc is not None and exc not in causes:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    refused = any(
        isinstance(c, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(c) for c in causes
    )
    if not refused:
        return f"cannot reach the Ray cluster at {address}: {causes[0]}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return f"the Ray cluster at {address} wants an auth token, which RAY_AUTH_MODE=disabled withholds"
    source = _token_source()
    if source is None:
        return f"the Ray cluster at {address} wants an auth token, and this machine has none: {_TOKEN_HELP}"
    return f"the Ray cluster at {address} refused the auth token in {source}: {_TOKEN_HELP}"
