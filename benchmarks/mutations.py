"""Mutation check: does the test suite catch a one-line break of each invariant that matters most?

For every mutation below (a file, an exact text that occurs once in it, its broken replacement and
the tests that must then fail) the script copies the repository to a temporary directory, applies
the mutation there, runs the named tests with pytest and reports whether they failed ("caught") or
passed ("missed"). The working tree is never modified. Not part of CI: each mutation runs its
tests once (some are 2-process DDP fits), so run a few at a time on a busy machine.

    python benchmarks/mutations.py --list
    python benchmarks/mutations.py --only race_own_times assign_ms_both_solvers

``--baseline`` first runs the named tests on the unmutated copy (they must pass, else a "caught"
would mean nothing). Prints a Markdown table and, with ``--json PATH``, writes the results.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "site", "*.ckpt", "lightning_logs"
)


@dataclass(frozen=True)
class Mutation:
    """One broken variant: replace ``old`` (which occurs exactly once in ``file``) by ``new``."""

    id: str
    invariant: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


CB, RACE, DIST, PROTOCOL = (
    "lightning_immiscible/callback.py",
    "lightning_immiscible/solver_race.py",
    "lightning_immiscible/distributed.py",
    "lightning_immiscible/protocol.py",
)
FAULTS = "tests/test_ddp_faults.py::test_a_rank_local_error_ends_every_rank_at_once_with_its_own_message"
FAULTS += "_on_an_accelerator_only_backend"
MUTATIONS = (
    Mutation(
        "race_own_times",
        "every rank of a group decides the solver race from the same gathered times",
        RACE,
        "self.times_us.setdefault(name, []).append(max(ts[i] for ts in us_per_reporter))",
        "self.times_us.setdefault(name, []).append(us_per_reporter[0][i])",
        (
            "tests/test_solver_race.py::test_a_groups_round_counts_its_slowest_rank_so_every_rank_decides_alike",
        ),
    ),
    Mutation(
        "race_discarded_on_key_change",
        "a race is kept per (pool, D, metric), so alternating item sizes still end it",
        RACE,
        "            race = self.races.get(key)\n            if race is None:\n",
        "            race = self.races.get(key) if list(self.races) in ([], [key]) else self.races.clear()\n"
        "            if race is None:\n",
        ("tests/test_solver_race.py::test_alternating_item_sizes_still_end_both_races",),
    ),
    Mutation(
        "race_unbounded",
        "a race whose rounds never count still ends (on the rule)",
        RACE,
        "return self.issued >= 2 * self.rounds",
        "return False",
        ("tests/test_solver_race.py::test_a_race_whose_rounds_never_count_ends_on_the_rule",),
    ),
    Mutation(
        "race_pool_per_rank",
        "every rank of a group chooses the solver for the pool the group agreed on in the header",
        DIST,
        "race.solver_for(step.total, x[0].numel(), spec.metric)",
        "race.solver_for(x.shape[0] * len(step.sizes), x[0].numel(), spec.metric)",
        (
            "tests/test_ddp_race.py::test_uneven_first_batches_choose_the_solver_of_the_agreed_pool_on_every_rank",
        ),
    ),
    Mutation(
        "worker_race_not_credited",
        "a race decided in DataLoader workers is kept across their re-forks (credited to the main collate)",
        "lightning_immiscible/worker_batches.py",
        "            self.collates[0].credit(worker)\n",
        "            pass\n",
        ("tests/test_solver_race.py::test_a_worker_race_decided_in_epoch_0_is_not_run_again_in_epoch_1",),
    ),
    Mutation(
        "collate_race_per_process",
        "each CouplingCollate owns its race (a process-wide one dies with each worker)",
        "lightning_immiscible/workers.py",
        "condition, race=self.race)",
        "condition, race=None)",
        (
            "tests/test_workers.py::test_a_worker_race_is_kept_across_epochs_without_the_callback",
            "tests/test_solver_race.py::test_a_worker_race_decided_in_epoch_0_is_not_run_again_in_epoch_1",
        ),
    ),
    Mutation(
        "fallback_credited",
        "a candidate whose backend fell back to SciPy is not credited SciPy's time (it is dropped)",
        RACE,
        "answers[name] = own_answer(SOLVERS[name], cost)",
        "answers[name] = SOLVERS[name].fn(cost)",
        (
            "tests/test_solver_race.py::test_a_backend_that_falls_back_is_dropped_from_the_race_not_credited_scipys_time",
            "tests/test_solver_race.py::test_a_fallback_in_the_group_race_is_reported_and_drops_the_candidate",
        ),
    ),
    Mutation(
        "solver_identity_unchecked",
        "the ranks of a group solve with the same solver, or all fail naming them",
        PROTOCOL,
        "        _agree_on_solver(group, mine, identity)\n",
        "        pass\n",
        (
            "tests/test_ddp_race.py::test_ranks_of_a_group_with_different_solvers_fail_with_a_message_naming_them",
        ),
    ),
    Mutation(
        "assign_ms_both_solvers",
        "assign_ms and the overhead warning count only the used solver on race batches",
        DIST,
        "solve_ms=max(found.solve_ms - race.extra_ms(), 0.0)",
        "solve_ms=found.solve_ms",
        ("tests/test_solver_race.py::test_race_batches_count_only_the_used_solvers_time_in_assign_ms",),
    ),
    Mutation(
        "float32_costs_forced",
        "huge or float64 data get float64 costs in the group path",
        DIST,
        'return AgreedStep(sizes, offset, torch.float64 if any(mine.column("wide")) else torch.float32)',
        "return AgreedStep(sizes, offset, torch.float32)",
        ("tests/test_callback.py::test_huge_data_is_coupled_with_float64_costs_through_the_callback",),
    ),
    Mutation(
        "draws_not_restored",
        "a resumed run continues the noise stream at the saved draw",
        CB,
        'fit.seed, fit.draws, fit.restored = state_dict["seed"], int(state_dict["draws"]), True',
        'fit.seed, fit.draws, fit.restored = state_dict["seed"], 0, True',
        ("tests/test_callback.py::test_resume_draws_the_same_noise_stream",),
    ),
    Mutation(
        "auto_group_size_not_restored",
        "scope='auto' keeps its measured group size on resume",
        CB,
        'fit.auto_group_size = state_dict.get("auto_group_size")',
        "fit.auto_group_size = None",
        ("tests/test_callback.py::test_scope_auto_group_size_is_restored_on_resume_in_the_same_world",),
    ),
    Mutation(
        "changed_setting_restarts_stream",
        "a resume with another method or scope continues the stream and says so",
        CB,
        'changed = changed_settings(state_dict.get("settings", {}), self.settings())',
        "changed = {}",
        (
            "tests/test_callback.py::test_a_resume_with_another_method_or_scope_continues_the_stream_and_says_so",
        ),
    ),
    Mutation(
        "stale_worker_noise_used",
        "worker noise drawn for another position is never used",
        "lightning_immiscible/worker_batches.py",
        "            return self._fallback(x0, worker, position, fallback)\n",
        "\n",
        (
            "tests/test_callback.py::test_stale_worker_noise_of_an_unidentifiable_collate_is_coupled_again_not_reused",
        ),
    ),
    Mutation(
        "hand_off_kept_after_skip",
        "the hand-off is released when the module skips the rest of the epoch",
        CB,
        "sampling.\n        hand_off(pl_module).release()",
        "sampling.\n        pass",
        (
            "tests/test_callback.py::test_the_hand_off_is_released_when_the_module_skips_the_rest_of_the_epoch",
        ),
    ),
    Mutation(
        "transformed_x0_mispaired",
        "noise_like never pairs the coupled noise with a transformed x0",
        "lightning_immiscible/mixin.py",
        "            _check_same_values(x0, coupled.x0)\n",
        "\n",
        ("tests/test_callback.py::test_noise_like_of_a_transformed_x0_raises_instead_of_mispairing",),
    ),
    Mutation(
        "epoch_not_compared",
        "ranks at different (epoch, draw) fail together instead of pairing across epochs",
        PROTOCOL,
        'steps = list(zip(heads.column("epoch"), heads.column("draw"), strict=True))',
        'steps = [(0, d) for d in heads.column("draw")]',
        (
            "tests/test_ddp_faults.py::test_ranks_with_different_batch_counts_fail_at_the_first_batch_of_the_next_epoch",
        ),
    ),
    Mutation(
        "pool_per_rank",
        "every rank of a group draws the same pool (global coupling = one process's)",
        DIST,
        "pool = draw_pool((step.total, *x.shape[1:]), seed, group.index, draw_index, x.device)",
        "pool = draw_pool((step.total, *x.shape[1:]), seed, process_rank(), draw_index, x.device)",
        ("tests/test_ddp.py::test_global_coupling_equals_single_process_coupling_of_concatenated_batch",),
    ),
    Mutation(
        "blocks_ignore_labels",
        "with a condition, each label's items take their own block of the pool, solved optimally",
        "lightning_immiscible/conditional.py",
        "    order = torch.argsort(labels, stable=True)\n",
        "    order = torch.arange(labels.numel())\n",
        ("tests/test_conditional.py::test_each_condition_is_solved_optimally_within_its_own_block",),
    ),
    Mutation(
        "non_finite_input_accepted",
        "NaN/Inf inputs fail with a clear error (the one-pass check)",
        "lightning_immiscible/checks.py",
        "        if not (math.isfinite(low) and math.isfinite(high)):",
        "        if False:",
        ("tests/test_coupling.py::test_non_finite_values_are_found_by_the_single_scan",),
    ),
    Mutation(
        "wide_labels_decided_alone",
        "the need for float64 rows (labels >= 2**24) travels in the header, so every rank gathers alike",
        DIST,
        "    wide = error is None and (wide or needs_wide_rows(condition))",
        "    wide = error is None and wide",
        ("tests/test_conditional_ddp.py::test_labels_beyond_float32_on_one_rank_only_travel_exactly",),
    ),
    Mutation(
        "worker_path_skips_header",
        "every rank sends the per-step header on the DataLoader-worker path too",
        CB,
        "            agree_on_step(\n",
        "            (lambda *a, **k: None)(\n",
        (f"{FAULTS}[worker]",),
    ),
    Mutation(
        "header_not_placed",
        "every exchanged tensor is placed on the exchange device (NCCL takes accelerator tensors only)",
        PROTOCOL,
        "    sent = place(head, group)\n",
        "    sent = head\n",
        (f"{FAULTS}[group]",),
    ),
    Mutation(
        "failing_rank_message_dropped",
        "every rank's error carries the failing rank's own message",
        PROTOCOL,
        'named = "; ".join(f"rank {heads.ranks[i]}: {heads.message(i)}" for i in failed)',
        'named = ""',
        ("tests/test_ddp.py::test_bad_input_on_one_rank_fails_all_ranks_without_hanging",),
    ),
    Mutation(
        "fit_state_kept",
        "two fits with one callback instance equal two fresh callbacks",
        CB,
        "        self._fit = fit = FitState(seed=self.seed)\n",
        "        fit = self._fit\n",
        ("tests/test_fit_state.py::test_two_fits_with_one_callback_behave_like_two_fresh_callbacks",),
    ),
    Mutation(
        "groups_not_released",
        "the process groups a fit creates are destroyed in its teardown",
        CB,
        "        hand_off(pl_module).release()\n        self._release_groups()\n",
        "        hand_off(pl_module).release()\n",
        ("tests/test_fit_state.py::test_each_fit_builds_its_process_groups_and_releases_them_in_teardown",),
    ),
    Mutation(
        "noise_not_taken_silent",
        "a module that never takes the coupled noise is warned, not silent",
        CB,
        "        if not taken:\n",
        "        if False:\n",
        ("tests/test_fit_state.py::test_noise_never_taken_is_warned_once_and_logged",),
    ),
    Mutation(
        "seed_unchecked",
        "constructor arguments are checked at construction, naming the argument",
        CB,
        "    if seed is None or (isinstance(seed, int)",
        "    if True or (isinstance(seed, int)",
        ("tests/test_fit_state.py::test_bad_constructor_arguments_fail_at_construction_naming_the_argument",),
    ),
    Mutation(
        "solve_finiteness_guard_removed",
        "no backend ever sees a NaN/Inf cost: solve() refuses it (lapjv aborts the process on one)",
        "lightning_immiscible/solvers.py",
        "    if not math.isfinite(top):\n        raise CouplingInputError(",
        "    if False:\n        raise CouplingInputError(",
        (
            "tests/test_solvers.py::test_solve_refuses_a_non_finite_cost_before_any_backend_sees_it",
            "tests/test_fuzz_inputs.py::test_every_input_pairs_optimally_or_fails_naming_the_problem[group]",
        ),
    ),
    Mutation(
        "costs_from_attached_x0",
        "costs are computed from detached inputs: an x0 that requires grad is coupled, not a crash",
        "lightning_immiscible/costs.py",
        "    x, noise = x.detach(), noise.detach()  # no graph through the costs",
        "    x, noise = x, noise  # no graph through the costs",
        (
            "tests/test_coupling.py::test_inputs_that_require_grad_are_coupled_detached_and_left_as_they_are",
            "tests/test_fuzz_inputs.py::test_every_input_pairs_optimally_or_fails_naming_the_problem[callback]",
        ),
    ),
    Mutation(
        "coupled_noise_keeps_its_graph",
        "couple()'s result noise carries no autograd graph (the inputs are detached on entry)",
        "lightning_immiscible/coupling.py",
        "    return x0.detach(), noise.detach()",
        "    return x0, noise",
        (
            "tests/test_coupling.py::test_inputs_that_require_grad_are_coupled_detached_and_left_as_they_are",
            "tests/test_fuzz_inputs.py::test_every_input_pairs_optimally_or_fails_naming_the_problem[couple]",
        ),
    ),
    Mutation(
        "pool_coupled_batch_by_batch",
        "a pool of k batches is coupled in one assignment over its k B items (labels: the pool's blocks)",
        "lightning_immiscible/workers.py",
        "        if len(x0s) == 1:\n            return [pooled]\n",
        "        if len(x0s) >= 1:\n            return [self.spec.couple(x, n, None if conditions is None "
        "else conditions[j], self.race) for j, (x, n) in enumerate(zip(x0s, noises))]\n",
        (
            "tests/test_pools.py::test_one_assignment_over_the_pool_is_optimal_and_beats_batch_by_batch",
            "tests/test_pools.py::test_labels_couple_within_the_pools_blocks_and_noise_crosses_batches",
        ),
    ),
    Mutation(
        "pool_batch_positions",
        "batch j of pool q draws the noise of batch position q k + j (the training loop's batch_idx)",
        "lightning_immiscible/workers.py",
        "positions = [(rank, epoch, pool * self.pool_batches + j) for j in range(len(chunks))]",
        "positions = [(rank, epoch, pool + j) for j in range(len(chunks))]",
        (
            "tests/test_pools.py::test_pool_noise_is_the_concatenated_draws_of_its_batch_positions",
            "tests/test_pools_fit.py::test_an_uninterrupted_run_uses_every_pooled_batch_at_its_own_position",
        ),
    ),
    Mutation(
        "embedding_weight_on_the_data_cost",
        "an embedding condition is coupled on M + w C (the weight multiplies the condition cost)",
        "lightning_immiscible/embedding.py",
        "    total = cost + weight * c if weight else cost",
        "    total = weight * cost + c if weight else cost",
        (
            "tests/test_embedding.py::test_the_pairing_is_scipys_optimum_of_the_cost_plus_the_weighted_condition",
        ),
    ),
    Mutation(
        "embedding_condition_of_another_item",
        "C[i, j] compares item i's condition with that of item j, the item pool noise j was drawn with",
        "lightning_immiscible/embedding.py",
        "        c = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)",
        "        c = sq[:, None] + np.roll(sq, 1)[None, :] - 2.0 * (z @ np.roll(z, 1, 0).T)",
        (
            "tests/test_embedding.py::test_the_condition_cost_is_the_distance_between_the_items_conditions",
            "tests/test_embedding.py::test_the_pairing_is_scipys_optimum_of_the_cost_plus_the_weighted_condition",
        ),
    ),
    Mutation(
        "leak_conditions_not_centred",
        "the condition leak fits the centred data on the centred conditions",
        "lightning_immiscible/embedding.py",
        "    centred = z - z.mean(0)\n",
        "    centred = z\n",
        ("tests/test_embedding.py::test_the_leak_equals_a_least_squares_fit_by_numpy",),
    ),
)


@dataclass
class Outcome:
    id: str
    invariant: str
    tests: list[str]
    result: str  # "caught", "missed", "baseline failed", "not applicable"
    seconds: float
    detail: str = ""


def copy_repo(dest: Path) -> Path:
    """The working tree (tracked and untracked files, no caches) under ``dest``."""
    target = dest / "repo"
    shutil.copytree(ROOT, target, ignore=IGNORE)
    return target


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """Runs ``tests`` in ``repo``; returns pytest's exit code (124 on timeout) and its last lines."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out (counted as caught: the mutation hangs the test)"
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def check(mutation: Mutation, timeout: float, baseline: bool) -> Outcome:
    """Applies one mutation to a fresh copy and runs its tests."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        repo = copy_repo(Path(tmp))
        path = repo / mutation.file
        text = path.read_text()
        if text.count(mutation.old) != 1:
            found = text.count(mutation.old)
            return Outcome(mutation.id, mutation.invariant, list(mutation.tests), "not applicable", 0.0,
                           f"the text to replace occurs {found} times in {mutation.file}")  # fmt: skip
        if baseline:
            code, tail = run_tests(repo, mutation.tests, timeout)
            if code != 0:
                return Outcome(mutation.id, mutation.invariant, list(mutation.tests), "baseline failed",
                               time.monotonic() - start, tail)  # fmt: skip
        path.write_text(text.replace(mutation.old, mutation.new))
        code, tail = run_tests(repo, mutation.tests, timeout)
    # pytest: 1 = tests failed; 124 = hung; 2-5 = usage / collection errors or no test ran
    result = "caught" if code in (1, 124) else "missed" if code == 0 else f"error (pytest exit {code})"
    return Outcome(
        mutation.id, mutation.invariant, list(mutation.tests), result, time.monotonic() - start, tail
    )


def table(outcomes: list[Outcome]) -> str:
    rows = ["| mutation | invariant | test | result |", "|---|---|---|---|"]
    for o in outcomes:
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in o.tests)
        rows.append(f"| `{o.id}` | {o.invariant} | {tests} | {o.result} ({o.seconds:.0f} s) |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="run each test unmutated first")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    known = {m.id: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.id}: {m.invariant} ({m.file}; {', '.join(m.tests)})")
        return 0
    unknown = set(args.only or ()) - set(known)
    if unknown:
        raise SystemExit(f"unknown mutation id(s) {sorted(unknown)}; see --list")
    chosen = [known[i] for i in args.only] if args.only else list(MUTATIONS)
    outcomes = []
    for mutation in chosen:
        outcome = check(mutation, args.timeout, args.baseline)
        print(f"{outcome.id}: {outcome.result} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    return 0 if all(o.result == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
