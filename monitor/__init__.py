"""turnout's monitor sidecar (drift and latency statistics over live traffic)."""
