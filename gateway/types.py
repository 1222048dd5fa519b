"""The data plane's own request and response types, shared by every transport.

What is known of a request before it is decoded (protocol, headers, arrival, trace) is its
:class:`gateway.context.RequestContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "Parameters",
    "RequestedOutput",
]

Parameters = dict[str, bool | int | float | str]


@dataclass(slots=True)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    inputs: list[InferInput]
    model_version: str = ""
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    outputs: list[RequestedOutput] = field(default_factory=list)
    timeout_s: float | None = None
    """From the gRPC deadline or the HTTP ``timeout`` parameter; None: the model's default."""
    routing_key: str | None = None
    """Sticky assignment key (header/metadata ``x-turnout-routing-key`` or ``routing_key``)."""


@dataclass(slots=True)
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    revision: int = 0
    """The traffic policy revision the version was chosen under."""
    arm: str = ""
    """How it was chosen: primary, canary or explicit."""
