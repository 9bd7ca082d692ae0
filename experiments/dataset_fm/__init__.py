"""The dataset-level coupling experiment (docs/results/dataset-coupling-preregistration.md)."""
