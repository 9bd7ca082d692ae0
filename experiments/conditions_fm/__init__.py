"""The runner of `docs/results/conditions-preregistration.md` (continuous conditions, larger pools)."""
