"""Serving benchmark for turnout: model builder, baselines and the load runner."""
