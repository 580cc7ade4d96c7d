"""The Ray token a job client sends, resolved the way Ray resolves it.

Ray 2.60 (token auth, https://docs.ray.io/en/latest/ray-security/token-auth.html): a client
sends a token only when ``RAY_AUTH_MODE=token``; the token is, in order of precedence,
``$RAY_AUTH_TOKEN``, the file at ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.
still resolves the same way and passes ``Authorization: Bearer …`` to
``JobSubmissionClient`` itself, so the header does not depend on when Ray's native config
was first read in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

from still.errors import StillError

TOKEN_HELP = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """Ray's default token file, ``~/.ray/auth_token``."""
    return Path.home() / ".ray" / "auth_token"


def token_mode() -> bool:
    """True when ``RAY_AUTH_MODE=token`` in this environment."""
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"


def resolve_token() -> tuple[str, str]:
    """Returns ``(token, source)`` under ``RAY_AUTH_MODE=token``, ``("", "")`` otherwise.

    Raises:
        StillError: token mode is on but no token can be found, or the token file named
            by ``RAY_AUTH_TOKEN_PATH`` cannot be read.
    """
    if not token_mode():
        return "", ""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_env:
        path = Path(path_env).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise StillError(f"RAY_AUTH_TOKEN_PATH={path_env} cannot be read: {exc.strerror}") from None
        if not token:
            raise StillError(f"RAY_AUTH_TOKEN_PATH={path_env} is empty: expected a Ray auth token")
        return token, f"RAY_AUTH_TOKEN_PATH={path_env}"
    path = default_token_path()
    token = path.read_text().strip() if path.is_file() else ""
    if token:
        return token, str(path)
    raise StillError(
        f"RAY_AUTH_MODE=token but no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {path}): "
        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    )


def auth_headers() -> dict[str, str]:
    """The HTTP headers for the job server: ``Authorization`` in token mode, else none."""
    token, _ = resolve_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def missing_token_error(address: str) -> StillError:
    """The one-line error for a 401 from the job server."""
    message = f"the cluster at {address} requires a token: {TOKEN_HELP}"
    if not token_mode() and default_token_path().is_file():
        message += f" (RAY_AUTH_MODE=token alone uses the token in {default_token_path()})"
    return StillError(message)


def rejected_token_error(address: str) -> StillError:
    """The one-line error for a 403 (a token was sent and is wrong)."""
    _, source = resolve_token()
    return StillError(
        f"the cluster at {address} rejected the token from {source or 'this environment'}: "
        "use the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    )
