"""Driver of ``tests/test_fuzz_inputs.py``: one forked child per (entry point, solver, input) case.

Run as a script (``python tests/fuzz_driver.py --out results.jsonl``): the parent imports torch,
Lightning, POT and the library once, then forks one child per case, so that a case that aborts the
process (a native solver fed NaN: ``free(): invalid next size``, SIGABRT) or hangs is recorded as
such instead of killing the test session. Each child sets one torch thread before any op (a child
forked from a process whose thread pool already ran can hang in its first GEMM; the parent runs no
torch op at all), runs its case, writes one JSON result and leaves with ``os._exit``.

A child reports one of

- ``paired``: the library's total distance of the pairs it returned (``lib``) and the optimum
  (``oracle``) from ``scipy.optimize.linear_sum_assignment`` on a float64 l2 cost that this file
  builds from the differences (NumPy, not the library's cost code), both divided by the same power
  of two (so that huge finite inputs have a finite oracle), the tolerance ``tol`` on the same
  scale, and ``problems``: the broken promises found on the way (``x0`` modified or detached from
  its graph, noise with a graph, an index that is no permutation, noise that is not the pool's);
- ``error``: an exception's type, ``reason`` (for a ``CouplingInputError``) and message;

and the parent adds ``aborted`` (killed by a signal), ``timeout`` and ``no result`` outcomes.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's library, not an installed one

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

import lightning_immiscible  # noqa: E402
from lightning_immiscible.coupling import CouplingSpec, couple  # noqa: E402
from lightning_immiscible.distributed import couple_in_group  # noqa: E402
from lightning_immiscible.groups import build_rank_group  # noqa: E402
from lightning_immiscible.solvers import available_solvers  # noqa: E402
from lightning_immiscible.streams import draw_pool  # noqa: E402
from lightning_immiscible.workers import INDEX_KEY, NOISE_KEY, POSITION_KEY, CouplingCollate  # noqa: E402

ENTRIES = ("couple", "spec_condition", "group", "collate", "callback")
INPUTS = (
    "nan",
    "pos_inf",
    "neg_inf",
    "huge_1e30",
    "huge_1e200",
    "huge_fmax_half",
    "requires_grad",
    "fp16",
    "bf16",
    "fp64",
    "non_contiguous",
    "empty",
    "one_item",
)
BATCH, ITEM = 8, (2, 3)
SEED = 0
TIMEOUT_S = {"callback": 60.0}
DEFAULT_TIMEOUT_S = 20.0
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
INT_VIEW[torch.float64] = torch.int64


def case_solvers() -> tuple[str, ...]:
    """The solvers every entry point runs with: "auto" and every installed one.

    Greedy counts as exact here: at 8 items it solves everything with its exact finish (its
    candidate rounds start above 64 rows).
    """
    return ("auto", *available_solvers())


# ---- inputs ---------------------------------------------------------------------------------


def make_input(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """`(x0, noise_scale)`: the fuzzed data and the scale of the noise the test gives with it.

    Huge inputs come with noise of their own scale where the test supplies the noise (`couple`,
    `CouplingSpec.couple`): with unit noise every pairing of data at 1e30 is equally good to float64's
    precision, so only scaled noise makes the pairing's optimality mean something.
    """
    b = {"empty": 0, "one_item": 1}.get(kind, BATCH)
    base = torch.randn((b, *ITEM), generator=gen)
    if kind in ("nan", "pos_inf", "neg_inf"):
        base[min(2, b - 1), 1, 0] = {"nan": math.nan, "pos_inf": math.inf, "neg_inf": -math.inf}[kind]
        return base, 1.0
    if kind.startswith("huge"):
        return _huge(kind, b, gen)
    if kind == "requires_grad":  # an encoder's output: a non-leaf with a graph behind it
        weight = torch.ones((), requires_grad=True)
        return base * weight, 1.0
    if kind in ("fp16", "bf16", "fp64"):
        return base.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[kind]), 1.0
    if kind == "non_contiguous":  # a transposed view: items are not contiguous in memory
        return torch.randn((b, *reversed(ITEM)), generator=gen).transpose(1, 2), 1.0
    return base, 1.0


def _huge(kind: str, b: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    if kind == "huge_1e30":  # finite in float32; its fp32 squared norms overflow
        return torch.randn((b, *ITEM), generator=gen) * 1e30, 1e30
    scale = 1e200 if kind == "huge_1e200" else float(np.finfo(np.float64).max) / 2
    uniform = torch.rand((b, *ITEM), generator=gen, dtype=torch.float64) * 2 - 1  # |x| <= scale: finite
    return uniform * scale, scale


def make_noise(x0: torch.Tensor, kind: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    """The noise the test passes to `couple` / `CouplingSpec.couple`: x0's dtype, layout and grad."""
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    noise = (noise.clamp(-1, 1) if scale > 1e30 else noise) * scale  # finite at float64's edge
    if kind == "non_contiguous":
        noise = noise.transpose(1, 2).contiguous().transpose(1, 2)
    noise = noise.to(x0.dtype)
    return noise.requires_grad_() if kind == "requires_grad" else noise


# ---- the oracle -----------------------------------------------------------------------------


def l2_cost(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`(b, B)` float64 Euclidean distances from the differences (broadcast: small test sizes only)."""
    return np.sqrt(((x[:, None, :] - n[None, :, :]) ** 2).sum(-1))


def as_rows(t: torch.Tensor) -> np.ndarray:
    """`(B, D)` float64 NumPy rows of a tensor of any float dtype (exact: every dtype fits float64)."""
    return t.detach().to(torch.float64).reshape(t.shape[0], math.prod(t.shape[1:])).numpy()


def common_scale(*arrays: np.ndarray) -> float:
    """A power of two at least the largest magnitude: distances divided by it stay finite, exactly."""
    top = max((float(np.abs(a).max()) for a in arrays if a.size), default=1.0)
    return 2.0 ** math.ceil(math.log2(top)) if top > 1 else 1.0


def optimum(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def block_optimum(cost: np.ndarray, labels: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Optimum within conditions, and each item's allowed pool columns (its label's block).

    The blocks as the library documents them: labels ascending, each label's block the next
    `count` pool positions; rows in batch order.
    """
    total, allowed, start = 0.0, [np.empty(0, dtype=np.int64)] * len(labels), 0
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        cols = np.arange(start, start + rows.size)
        total += optimum(cost[np.ix_(rows, cols)])
        for r in rows:
            allowed[r] = cols
        start += rows.size
    return total, allowed


@dataclass
class Pairing:
    """What an entry point returned, reduced to what the oracle judges.

    Attributes:
        pool: `(B, *dims)` the noise the pairing drew from (the test's, or the library's pool).
        paired: `(B, *dims)` the noise paired with each item, in the values the library solved on.
        labels: `(B,)` the condition, when the entry coupled within it.
        index: `(B,)` the pool row of each item, when the entry reports it.
        rounding: Relative rounding of `paired` against the values the library solved on.
        problems: Broken promises found while unpacking the result.
    """

    pool: torch.Tensor
    paired: torch.Tensor
    labels: np.ndarray | None = None
    index: torch.Tensor | None = None
    rounding: float = 0.0
    problems: list[str] = field(default_factory=list)


def verdict_numbers(x0: torch.Tensor, found: Pairing) -> dict[str, Any]:
    """`lib`, `oracle` and `tol` for the pairs `(x0[i], found.paired[i])` drawn from `found.pool`.

    `found.rounding`: the callback hands the noise over in x0's dtype, so each reported noise may
    differ from the solved one by `rounding * |n|`, which moves a total by at most twice the sum of
    that (both the library's total and the optimum).
    """
    x, n, p = as_rows(x0), as_rows(found.pool), as_rows(found.paired)
    if not all(np.isfinite(a).all() for a in (x, n, p)):
        return {"lib": math.nan, "oracle": math.nan, "tol": 0.0, "problems": ["paired non-finite values"]}
    s = common_scale(x, n, p)
    x, n, p = x / s, n / s, p / s
    cost = l2_cost(x, n)
    lib = float(np.sqrt(((x - p) ** 2).sum(-1)).sum())
    problems = []
    if found.labels is None:
        oracle = optimum(cost)
    else:
        oracle, allowed = block_optimum(cost, found.labels)
        cols = found.index.tolist() if found.index is not None else []
        if any(c not in allowed[i] for i, c in enumerate(cols)):
            problems.append("an item took noise from another label's block")
    norms_x, norms_n = np.linalg.norm(x, axis=1), np.linalg.norm(n, axis=1)
    top_n = float(norms_n.max()) if norms_n.size else 0.0
    tol = 1e-5 * float((norms_x + top_n).sum()) + 2 * found.rounding * float(norms_n.sum()) + 1e-12
    return {"lib": lib, "oracle": oracle, "tol": tol, "problems": problems}


# ---- the entry points -----------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (NaN compares equal to itself), as a detached copy."""
    return t.detach().view(INT_VIEW[t.dtype]).clone()


def untouched(name: str, t: torch.Tensor, before: torch.Tensor, had_grad: bool) -> list[str]:
    """What changed about a caller's tensor: its values, or its place in the autograd graph."""
    problems = [] if torch.equal(bits(t), before) else [f"{name} was modified in place"]
    return problems + ([f"{name} lost requires_grad"] if had_grad and not t.requires_grad else [])


def is_permutation(index: torch.Tensor, b: int) -> bool:
    return tuple(index.shape) == (b,) and sorted(index.tolist()) == list(range(b))


def paired_checks(noise: torch.Tensor, index: torch.Tensor, pool: torch.Tensor, b: int) -> list[str]:
    """The result's noise must be the pool's rows at `index` (a permutation), without a graph."""
    problems = [] if is_permutation(index, b) else [f"index {index.tolist()} is not a permutation"]
    if noise.requires_grad:
        problems.append("the returned noise requires grad")
    if not problems and not torch.equal(bits(noise), bits(pool.detach()[index].to(noise.dtype))):
        problems.append("the returned noise is not pool[index]")
    return problems


def run_couple(x0: torch.Tensor, solver: str, kind: str, scale: float, gen: torch.Generator) -> Pairing:
    noise = make_noise(x0, kind, scale, gen)
    before, had_grad = bits(noise), noise.requires_grad
    res = couple(x0, noise, solver=solver)
    problems = paired_checks(res.noise, res.index, noise, x0.shape[0])
    return Pairing(noise, res.noise, problems=problems + untouched("noise", noise, before, had_grad))


def run_spec_condition(
    x0: torch.Tensor, solver: str, kind: str, scale: float, gen: torch.Generator
) -> Pairing:
    noise = make_noise(x0, kind, scale, gen)
    labels = torch.arange(x0.shape[0]) % 3  # blocks of 3, 3 and 2 items
    res = CouplingSpec(solver=solver).couple(x0, noise, labels)
    problems = paired_checks(res.noise, res.index, noise, x0.shape[0])
    return Pairing(noise, res.noise, labels.numpy(), res.index, problems=problems)


def run_group(x0: torch.Tensor, solver: str, kind: str, scale: float, gen: torch.Generator) -> Pairing:
    group = build_rank_group("global")  # one process: a group of one
    res = couple_in_group(x0, group, seed=SEED, draw_index=0, spec=CouplingSpec(solver=solver))
    pool = draw_pool(tuple(x0.shape), SEED, group.index, 0)
    return Pairing(pool, pool[res.index], problems=paired_checks(res.noise, res.index, pool, x0.shape[0]))


def run_collate(x0: torch.Tensor, solver: str, kind: str, scale: float, gen: torch.Generator) -> Pairing:
    # The inner collate hands over the fuzzed tensor as it is (default_collate would stack a copy:
    # no view, no graph, no empty batch left to fuzz).
    collate = CouplingCollate("lsa", seed=SEED, collate_fn=lambda samples: x0, solver=solver)
    batch = collate(list(range(x0.shape[0])))
    pool = collate.noise_for(x0, tuple(int(v) for v in batch[POSITION_KEY].tolist()))
    problems = paired_checks(batch[NOISE_KEY], batch[INDEX_KEY], pool, x0.shape[0])
    return Pairing(pool, pool[batch[INDEX_KEY]], problems=problems)


def run_callback(x0: torch.Tensor, solver: str, kind: str, scale: float, gen: torch.Generator) -> Pairing:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_immiscible import ImmiscibleCoupling, ImmiscibleMixin

    class Fuzzed(ImmiscibleMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(1, 1)
            self.noise: torch.Tensor | None = None

        def immiscible_data(self, batch: Any) -> torch.Tensor:
            return x0  # e.g. a VAE's latents: whatever the module computes from the batch

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.noise = self.noise_like(self.coupled_data(batch)).detach().clone()
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Fuzzed()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ImmiscibleCoupling(solver=solver, seed=SEED)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=4))
    if module.noise is None:
        return Pairing(x0, x0, problems=["training_step never ran"])
    # The pool is the callback's own: the noise it handed over is the set the pairing is judged on,
    # rounded to x0's dtype.
    rounding = float(torch.finfo(x0.dtype).eps) if x0.dtype != torch.float32 else 0.0
    return Pairing(module.noise, module.noise, rounding=rounding)


RUNNERS: dict[str, Callable[..., Pairing]] = {
    "couple": run_couple,
    "spec_condition": run_spec_condition,
    "group": run_group,
    "collate": run_collate,
    "callback": run_callback,
}


def run_case(entry: str, solver: str, kind: str) -> dict:
    """Runs one case in this (child) process and returns its JSON-able result."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entry}/{solver}/{kind}".encode()))
    x0, scale = make_input(kind, gen)
    before, had_grad = bits(x0), x0.requires_grad
    try:
        found = RUNNERS[entry](x0, solver, kind, scale, gen)
    except Exception as exc:
        return {
            "outcome": "error",
            "type": type(exc).__name__,
            "reason": getattr(exc, "reason", None),
            "message": str(exc),
            "traceback": traceback.format_exc()[-2000:],
        }
    out = {"outcome": "paired", **verdict_numbers(x0, found)}
    out["problems"] += found.problems + untouched("x0", x0, before, had_grad)
    return out


# ---- the parent: one fork per case ----------------------------------------------------------


def fork_case(entry: str, solver: str, kind: str, workdir: Path, number: int) -> dict:
    """Runs a case in a forked child; records how the child ended."""
    result, log = workdir / f"{number}.json", workdir / f"{number}.log"
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            torch.set_num_threads(1)  # before any op (see the module docstring)
            faulthandler.disable()  # an abort is the parent's to report, not a traceback on its stderr
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            result.write_text(json.dumps(run_case(entry, solver, kind)))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT_S.get(entry, DEFAULT_TIMEOUT_S)
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"outcome": "timeout", "log": _tail(log)}
        else:
            time.sleep(0.005)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"outcome": "aborted", "signal": name, "log": _tail(log)}
    if not result.exists():
        return {"outcome": "no result", "exit": os.waitstatus_to_exitcode(status), "log": _tail(log)}
    return json.loads(result.read_text())


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per case")
    parser.add_argument("--entries", nargs="*", default=list(ENTRIES), choices=ENTRIES)
    parser.add_argument("--inputs", nargs="*", default=list(INPUTS), choices=INPUTS)
    args = parser.parse_args()
    import lightning  # noqa: F401  imported once here, not in every child

    if "pot" in available_solvers():
        import ot  # noqa: F401  (importing POT takes seconds: once, here)
    cases = [(e, s, k) for e in args.entries for s in case_solvers() for k in args.inputs]
    gc.freeze()  # the children share the imported objects without copying their pages for the GC
    with tempfile.TemporaryDirectory() as tmp, args.out.open("w") as out:
        header = {"library": lightning_immiscible.__file__, "cases": len(cases)}
        out.write(json.dumps(header) + "\n")
        for number, (entry, solver, kind) in enumerate(cases):
            start = time.perf_counter()
            record = fork_case(entry, solver, kind, Path(tmp), number)
            record |= {"entry": entry, "solver": solver, "input": kind, "s": time.perf_counter() - start}
            out.write(json.dumps(record) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
