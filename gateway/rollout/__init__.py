"""Automated rollouts and A/B experiments: evidence, gates, the controller."""
