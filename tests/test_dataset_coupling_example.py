"""The flow-matching example with the dataset-level coupling overlay, end to end on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_immiscible import FitSemidiscreteMap

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "example_projects/flow_matching/configs"


@pytest.mark.timeout(600)
def test_the_dataset_overlay_fits_the_map_and_trains_on_its_images(tmp_path, monkeypatch):
    # quickstart + compare (16x16) + heldout + dataset, shortened: the map is built from the 4,000
    # training digits in the datamodule, fitted by the overlay's callback before the loader starts,
    # each batch's images are the map's images of noise_like's noise, and FID statistics come from
    # the 1,000 held-out digits. Catches an overlay whose callback cannot find the map, a map of all
    # 5,000 digits (held-out digits in training), and FID against training digits.
    from example_projects.flow_matching.__main__ import fit_cli

    short = tmp_path / "short.yaml"
    short.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_immiscible.FitSemidiscreteMap\n"
        "      init_args: {steps: 40, batch_size: 256, check_every: 20}\n"
        "    - class_path: lightning_immiscible.ImmiscibleCoupling\n      init_args: {scope: local}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli"])
    args = [f"--config={CONFIGS / name}.yaml" for name in ("quickstart", "compare", "heldout", "dataset")]
    args += [f"--config={short}", "--trainer.max_steps=3", "--trainer.val_check_interval=null",
             "--trainer.limit_val_batches=0", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false"]  # fmt: skip
    cli = fit_cli(args, run=False)
    dm = cli.datamodule
    dm.setup()
    assert len(dm.train_set) == 4000 and len(dm.real_images()) == 1000 and dm.sd_map.n == 4000
    fits = [cb for cb in cli.trainer.callbacks if isinstance(cb, FitSemidiscreteMap)]
    assert len(fits) == 1
    seen = []
    original = cli.model.training_step

    def record(batch, batch_idx):
        x0 = cli.model.coupled_data(batch)
        seen.append((x0.detach().clone(), cli.model.noise_like(x0).detach().clone()))
        return original(batch, batch_idx)

    monkeypatch.setattr(cli.model, "training_step", record)
    cli.trainer.fit(cli.model, datamodule=dm)
    assert dm.sd_map.steps == 40 and fits[0].chi2 is not None and len(seen) == 3
    images = dm.train_set.tensors[0].reshape(4000, -1).double()
    for x0, noise in seen:  # each image is the map's image of its own noise (brute force)
        cost = torch.cdist(noise.reshape(len(noise), -1).double(), images).pow(2) - dm.sd_map.potentials[None]
        torch.testing.assert_close(x0.reshape(len(x0), -1).double(), images[cost.argmin(1)])
