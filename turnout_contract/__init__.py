"""What the gateway and the monitor sidecar agree on, and nothing else.

Both ``gateway/`` and ``monitor/`` import this package; it imports neither. It holds the
record a request leaves behind and the frame that carries records over the Unix socket
(``records``), the trace context the ids in a record belong to (``trace``), the one table of
statuses with their HTTP status and gRPC code (``status``), where the socket and the state
directory are (``address``) and the layered settings loader both processes use
(``settings``).
"""
