"""Runnable example projects for lightning-immiscible (templates to copy and adapt)."""
