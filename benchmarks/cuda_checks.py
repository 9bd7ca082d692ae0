"""CUDA checks of the coupling (run on a GPU machine; prints and writes JSON).

- the half-precision cost matrices (fp16 / bf16, norm-scaled) recover a planted permutation and
  reach the fp32 optimum's objective (relative gap, objective evaluated exactly in fp64);
- no overflow with large-valued inputs (latents x 300);
- a 1-GPU Lightning fit with ``16-mixed`` and ``bf16-mixed`` hands the module the coupled pool
  noise in fp32 on the GPU;
- cost-matrix time per precision (CUDA events), against the paper's fp16 broadcast difference.

    python benchmarks/cuda_checks.py --json OUT/cuda_checks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_immiscible import ImmiscibleCoupling, couple
from lightning_immiscible.costs import cost_matrix
from lightning_immiscible.streams import draw_pool


def _objective(x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x0.double() - noise[index].double()).flatten(1), dim=1).sum())


def check_precisions(b: int = 1024, d: int = 3072) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.rand(b, d, device="cuda", generator=gen) * 2 - 1
    noise = torch.randn(b, d, device="cuda", generator=gen)
    perm = torch.randperm(b, device="cuda", generator=gen)
    planted = x0[perm] + 1e-3 * torch.randn(b, d, device="cuda", generator=gen)
    exact = _objective(x0, noise, couple(x0, noise, precision="fp32").index)
    out = {}
    for precision in ("fp32", "bf16", "fp16", "auto"):
        res = couple(x0, noise, precision=precision)
        recovered = couple(x0, planted, precision=precision).index
        big = x0 * 300
        finite = bool(torch.isfinite(cost_matrix(big, noise * 300, "l2", precision)).all())
        out[precision] = {
            "planted_permutation_recovered": bool(
                torch.equal(perm[recovered], torch.arange(b, device="cuda"))
            ),
            "relative_gap_to_fp32_optimum": (_objective(x0, noise, res.index) - exact) / exact,
            "reduction_pct": res.reduction_pct,
            "finite_with_large_values": finite,
            "noise_on_cuda": res.noise.is_cuda,
        }
    return out


def _time_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_one(x0: torch.Tensor, noise: torch.Tensor) -> dict:
    row = {}
    for precision in ("fp32", "bf16", "fp16"):
        row[f"ours_{precision}_ms"] = _time_ms(lambda p=precision: cost_matrix(x0, noise, "l2", p))
    if x0.shape[0] * noise.shape[0] * x0.shape[1] * 2 <= 20e9:
        row["paper_fp16_broadcast_ms"] = _time_ms(
            lambda: torch.linalg.vector_norm(x0.half()[:, None] - noise.half()[None], dim=2), repeats=3
        )
    row["cdist_fp32_ms"] = _time_ms(lambda: torch.cdist(x0, noise))
    return row


def time_cost_matrices(sizes=(1024, 2048, 4096), d: int = 3072) -> list[dict]:
    rows = []
    for b in sizes:
        x0 = torch.rand(b, d, device="cuda") * 2 - 1
        noise = torch.randn(b, d, device="cuda")
        row = {"B": b, "D": d, **_time_one(x0, noise)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def check_lightning_fit(precision: str) -> dict:
    import lightning as L

    from tests.helpers import ToyDiffusion

    module, cb = ToyDiffusion(sizes=(64,), batch_size=32), ImmiscibleCoupling(seed=2)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=2, logger=False, callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    ok = []
    for draw, rec in enumerate(module.records):
        pool = draw_pool(rec["x0"].shape, 2, 0, draw, device="cuda")
        ok.append(bool(torch.equal(rec["noise"], couple(rec["x0"], pool).noise)))
    rec = module.records[0]
    return {
        "matches_pool_coupling": all(ok),
        "noise_dtype": str(rec["noise"].dtype),
        "device": str(rec["noise"].device),
        "reduction_pct": cb.last_result.reduction_pct,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="names of the checks to run")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("these checks need a CUDA GPU and torch.cuda.is_available() is False here")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    only = set(args.only or [])
    checks = {
        "precisions_B1024_D3072": check_precisions,
        "cost_matrix_ms": time_cost_matrices,
        "lightning_fit_16_mixed": lambda: check_lightning_fit("16-mixed"),
        "lightning_fit_bf16_mixed": lambda: check_lightning_fit("bf16-mixed"),
    }
    for name, check in checks.items():
        if only and name not in only:
            continue
        try:
            result[name] = check()
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, json.dumps(result[name], indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
