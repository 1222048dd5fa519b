"""Bearer tokens with roles: ``admin`` may change traffic and models, ``infer`` may only infer.

The data plane checks inference tokens (``require_infer_token``); the admin adapters check
admin tokens. Both use the one :class:`TokenAuth` built at start-up.

With no tokens configured, the first start writes one admin token to
``STATE_DIR/tokens.json`` (mode 0600), where the CLI on the same machine finds it.
Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.errors import PermissionDenied, Unauthenticated

__all__ = ["Token", "TokenAuth", "load_or_create_tokens"]

Role = Literal["admin", "infer"]
TOKENS_FILE = "tokens.json"


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    secret: str
    role: Role


def load_or_create_tokens(state_dir: Path, configured: list[Token]) -> list[Token]:
    if configured:
        return configured
    path = state_dir / TOKENS_FILE
    if path.exists():
        entries = json.loads(path.read_text())["tokens"]
        return [Token(e["name"], e["token"], e["role"]) for e in entries]
    state_dir.mkdir(parents=True, exist_ok=True)
    token = Token("admin", secrets.token_urlsafe(32), "admin")
    # Create with 0600 from the start: the secret is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"tokens": [{"name": token.name, "token": token.secret, "role": "admin"}]}, handle
        )
    return [token]


class TokenAuth:
    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    def authenticate(self, authorization: str | None, needed: Role) -> str:
        """Return the token's name; 401 without a valid token, 403 without the role."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token (header 'authorization: Bearer <token>')")
        presented = authorization[7:].strip().encode()
        match = None
        for token in self._tokens:
            # Check every token so timing does not reveal which one (or whether any) matched.
            if hmac.compare_digest(presented, token.secret.encode()):
                match = token
        if match is None:
            raise Unauthenticated("invalid bearer token")
        if needed == "admin" and match.role != "admin":
            raise PermissionDenied(f"token '{match.name}' has role '{match.role}', not 'admin'")
        return match.name
