"""Integrations with downstream frameworks; each imports its framework lazily (optional dependencies)."""
