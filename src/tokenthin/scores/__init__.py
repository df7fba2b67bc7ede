"""Signals computed from what a layer already has: queries, keys, hidden states."""
