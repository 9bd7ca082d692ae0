"""Experiments: pre-registered runs that need more than one library feature (run from a clone's root)."""
