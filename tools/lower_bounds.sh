#!/usr/bin/env bash
# Lower-bound check: the library's tests on the lowest versions pyproject.toml declares.
#
#   tools/lower_bounds.sh [--python 3.10|PATH] [--newest] [--venv DIR] [--dry-run] [-- PYTEST_ARGS...]
#
# A fresh virtual environment (default .venv-floors/, git-ignored) gets the library with its `fast`
# and `pot` extras, each direct dependency at the lowest release with a wheel for that Python
# (`uv pip install --resolution lowest-direct --only-binary :all:` from PyPI; their own dependencies
# are the newest that fit, as a user's install picks them), and the test tools at their declared
# floors. tools/check_floors.py prints what was installed and fails unless each declared floor was
# (its release series); then the library's tests run: tests/ less EXTRAS_ONLY below.
#
# Default Python: 3.10, the lowest that pyproject.toml declares (from PATH or pyenv). --newest
# installs the newest releases instead (default venv .venv-newest/): the Python-range check,
# `--python 3.13 --newest`. --dry-run finds the Python and prints the plan, installing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python_spec=3.10
resolution=lowest-direct
venv=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) python_spec="$2"; shift 2 ;;
    --newest) resolution=highest; shift ;;
    --venv) venv="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "lower_bounds: unknown option $1 (pytest's go after --)" >&2; exit 2 ;;
  esac
done

# The library's tests: everything under tests/ except the files that need the heavy extras
# (examples, docs, benchmarks, packaging) and one benchmark-runner test in a library file.
EXTRAS_ONLY=(
  tests/examples
  tests/test_benchmark_scripts.py
  tests/test_cli.py
  tests/test_conditions_fm.py
  tests/test_dataset_coupling_example.py
  tests/test_dataset_fm.py
  tests/test_decisions.py
  tests/test_doc_commands.py
  tests/test_docs.py
  tests/test_flow_matching_report.py
  tests/test_packaging.py
  tests/test_readme.py
  tests/test_regimes.py
  tests/test_site_html.py
  tests/test_speedup.py
  tests/test_conditional.py::test_the_preregistered_runner_resumes_and_reports_every_listed_comparison
)
# What test_callback.py's LightningCLI test imports (the examples extra's floor).
TEST_TOOLS=("pytest>=7.4" "pytest-timeout>=2.2" "jsonargparse[signatures]>=4.27.7")

find_python() {
  local spec="$1" root
  if [[ "$spec" == */* ]]; then echo "$spec"; return; fi
  if command -v "python$spec" >/dev/null && "python$spec" -c '' 2>/dev/null; then
    command -v "python$spec"; return
  fi
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in "$root"/versions/"$spec".*/bin/"python$spec"; do
    [[ -x "$candidate" ]] && { echo "$candidate"; return; }
  done
  echo "lower_bounds: no Python $spec on PATH or in pyenv ($root/versions)" >&2
  return 1
}

python="$(find_python "$python_spec")"
[[ -n "$venv" ]] || venv=$([[ $resolution == highest ]] && echo .venv-newest || echo .venv-floors)
start=$SECONDS
echo "lower_bounds: $("$python" --version) ($python), resolution=$resolution, venv=$venv"
args=()
for item in "${EXTRAS_ONLY[@]}"; do
  if [[ "$item" == *::* ]]; then args+=(--deselect "$item"); else args+=(--ignore "$item"); fi
done
echo "lower_bounds: the tests: tests/ without these (they need the examples, docs or benchmark extras):"
printf '  %s\n' "${EXTRAS_ONLY[@]}"
[[ $dry_run == 1 ]] && exit 0

if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
  echo "lower_bounds: $venv exists and is not a virtual environment; not replacing it" >&2
  exit 1
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
# --system-certs: the operating system's CA store (pip's too), as a proxy's certificate needs.
"$venv/bin/uv" pip install --system-certs --python "$venv/bin/python" --resolution "$resolution" \
  --only-binary :all: -e ".[fast,pot]" "${TEST_TOOLS[@]}"
"$venv/bin/python" tools/check_floors.py --resolution "$resolution" "${TEST_TOOLS[@]}"
echo "lower_bounds: installed in $((SECONDS - start)) s"

MPLBACKEND=Agg "$venv/bin/python" -m pytest -p no:cacheprovider "${args[@]}" "$@" tests
