"""Measurement: tasks, metrics, timing, results."""
