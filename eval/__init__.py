"""Evaluation scripts and metric modules loaded by path (no Hub access needed)."""
