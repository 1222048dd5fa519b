"""The ``turnout`` command, above the gateway and the monitor sidecar."""
