"""Shared building blocks of the example projects: UNet, EMA, data, FID, sample grids, progress.

Each module is importable on its own; heavy dependencies (torchvision, torchmetrics, mlxtend) are
imported inside the functions that need them.
"""
