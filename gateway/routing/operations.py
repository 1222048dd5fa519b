"""Traffic operations as pure functions: (operation, request body, current policy, older
policies) -> the new policy's fields.

Nothing here reads or writes state, so every store (the state directory, the Ray actor)
applies a change the same way: read the current policy, compute the new fields here,
validate, then compare-and-set the next revision.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gateway.errors import InvalidInput
from gateway.routing.policy import TrafficPolicy

__all__ = ["OPERATIONS", "apply_operation", "build_policy", "parse_int"]

OPERATIONS = ("set", "switch", "promote", "rollback", "shadow", "clear_shadow", "fault")
MANUAL_MOVES = ("set", "switch", "promote", "rollback")
"""Operations that move traffic by hand: they end an automated rollout (it would fight them)."""
ACTIVE_PHASES = ("progressing", "paused")
FAULT_FIELDS = ("abort_percent", "abort_status", "delay_ms", "delay_percent")


def parse_int(field: str, value: Any) -> int:
    """An integer from JSON (a number or a numeric string), or InvalidInput naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(f"{field} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{field} must be an integer, got {value!r}") from None


def _weights(value: Any) -> dict[int, int]:
    if not isinstance(value, dict) or not value:
        raise InvalidInput('weights must be an object of version -> percent, e.g. {"1": 90}')
    return {
        parse_int("weights version", key): parse_int(f"weights[{key}]", weight)
        for key, weight in value.items()
    }


def apply_operation(
    operation: str, body: dict[str, Any], current: TrafficPolicy, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields of the policy that ``operation`` makes of ``current``.

    ``current`` is the stored policy, or the default one when none was stored; ``history``
    holds the older policies, oldest first (``rollback`` returns to the last one). The
    result has no ``model`` or ``revision``: the store assigns those. Raises InvalidInput
    for an unknown operation or a malformed body; the result itself is validated by
    ``build_policy``.
    """
    model = current.model
    fields = current.model_dump(exclude={"model", "revision"})
    if operation == "set":
        fields["weights"] = _weights(body.get("weights"))
        if "standby" in body:
            standby = body["standby"]
            fields["standby"] = None if standby is None else parse_int("standby", standby)
        elif current.standby is not None:
            fields["standby"] = None  # new weights end a blue-green pair
        if "allow_explicit_version" in body:
            allow = body["allow_explicit_version"]
            if not isinstance(allow, bool):
                raise InvalidInput("allow_explicit_version must be true or false")
            fields["allow_explicit_version"] = allow
    elif operation == "switch":
        if current.standby is None:
            raise InvalidInput(
                f"model '{model}' has no standby version to switch to; set one with "
                "'set' and a 'standby' version"
            )
        fields["weights"] = {current.standby: 100}
        fields["standby"] = current.primary
    elif operation == "promote":
        fields["weights"] = {parse_int("version", body.get("version")): 100}
        fields["standby"] = None
    elif operation == "rollback":
        if not history:
            raise InvalidInput(f"model '{model}' has no earlier revision to roll back to")
        fields = {k: v for k, v in history[-1].items() if k not in ("model", "revision")}
    elif operation == "shadow":
        fields["shadow"] = {
            "version": parse_int("version", body.get("version")),
            "percent": body.get("percent", 100),
        }
    elif operation == "clear_shadow":
        fields["shadow"] = None
    elif operation == "fault":
        version = parse_int("version", body.get("version"))
        faults = dict(fields.get("faults") or {})
        if body.get("clear"):
            faults.pop(version, None)
        else:
            unknown = sorted(set(body) - {"op", "version", "clear", "if_revision", *FAULT_FIELDS})
            if unknown:
                raise InvalidInput(f"unknown fault field(s) {', '.join(unknown)}")
            faults[version] = {k: body[k] for k in FAULT_FIELDS if k in body}
        fields["faults"] = faults
    else:
        raise InvalidInput(
            f"unknown operation '{operation}' (expected one of {', '.join(OPERATIONS)})"
        )
    rollout = fields.get("rollout")
    if operation in MANUAL_MOVES and rollout and rollout.get("phase") in ACTIVE_PHASES:
        fields["rollout"] = {
            **rollout,
            "phase": "aborted",
            "reason": f"ended by a manual '{operation}' of the traffic policy",
        }
    experiment = fields.get("experiment")
    if operation in MANUAL_MOVES and experiment and experiment.get("phase") == "running":
        fields["experiment"] = {
            **experiment,
            "phase": "stopped",
            "reason": f"ended by a manual '{operation}' of the traffic policy",
        }
    return fields


def build_policy(model: str, fields: dict[str, Any], revision: int) -> TrafficPolicy:
    """Validate ``fields`` as a whole policy at ``revision``; InvalidInput lists every problem."""
    try:
        return TrafficPolicy.model_validate({**fields, "model": model, "revision": revision})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(f"invalid traffic policy for model '{model}': {problems}") from None
