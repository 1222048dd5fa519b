"""Exporters of the monitor's state: Prometheus metrics and the status JSON over HTTP."""

from monitor.exporters.prometheus import MonitorCollector, build_registry

__all__ = ["MonitorCollector", "build_registry"]
