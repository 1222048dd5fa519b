"""Traffic policies: which version serves each request, and the store that shares them."""

from __future__ import annotations

from gateway.errors import InvalidInput
from gateway.types import Parameters

__all__ = ["REVISION_HEADER", "ROUTING_KEY_HEADER", "VERSION_HEADER", "routing_key"]

ROUTING_KEY_HEADER = "x-turnout-routing-key"
VERSION_HEADER = "x-turnout-version"
REVISION_HEADER = "x-turnout-revision"


def routing_key(header: str | None, parameters: Parameters) -> str | None:
    """The sticky key: the header/metadata wins over the ``routing_key`` request parameter."""
    if header:
        return header
    value = parameters.get("routing_key")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput("parameters.routing_key must be a non-empty string")
    return value
