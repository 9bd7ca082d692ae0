"""The docs give one answer to "Should you turn it on?": the decision table rendered from docs/decisions.yml.

The landing page once said in one table that OT pairs reached the baseline's quality 2x sooner and
that no speed-up was measured, and three pages recommended three different scopes. The verdicts now
live in one data file, rendered into the home page and the README; these tests check that both show
exactly that rendering, that the other advice pages link it instead of keeping their own verdict
table, and that no page makes a claim the evidence retired.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("decision_table", DOCS / "scripts" / "decision_table.py")
decision_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decision_table)
DATA = decision_table.load()
#: Every page a reader meets: the docs site, the README and the example projects' READMEs.
PAGES = sorted([*DOCS.rglob("*.md"), ROOT / "README.md", *(ROOT / "example_projects").glob("*/README.md")])


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _joined(path: Path) -> str:
    """The page's text with its line breaks joined (a claim may wrap)."""
    return " ".join(path.read_text(encoding="utf-8").split())


@pytest.mark.parametrize("page", sorted(decision_table.PAGES))
def test_the_pages_show_the_table_rendered_from_the_data_file(page):
    # Catches a hand edit of the table on one page (tried: "**off**" changed to "**on**" in the
    # README's DDPM row) and a data file changed without re-rendering.
    shown = decision_table.rendered_block((ROOT / page).read_text(encoding="utf-8"))
    assert shown == decision_table.render_for(page, DATA), (
        f"{page}: run python docs/scripts/decision_table.py"
    )


def test_the_table_sits_under_the_snippet_before_install():
    for page in decision_table.PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        snippet = text.index("```python")
        assert snippet < text.index("## Should you turn it on?") < text.index("## Install"), page


def test_each_row_has_one_short_verdict_and_links_the_page_with_its_numbers():
    for row in DATA["rows"]:
        assert row["verdict"] in DATA["verdicts"], row
        measured = " ".join(row["measured"].split())
        assert len(measured.split()) <= 50, f"too long for a table cell: {measured}"
        targets = re.findall(r"\]\(([^)#\s]+)", measured)
        assert targets, f"link the page that holds the numbers: {row['training']}"
        for target in targets:
            assert (DOCS / target).is_file(), target
        # no effect sizes in the table: they live on the linked pages
        assert not re.search(r"\d+(\.\d+)? ?(%|x\b)|\bp ?[<=]", measured), measured


def test_no_other_page_carries_a_decision_table():
    # Caught (before this change): Choosing a method's own "Should you turn it on?" table, whose
    # 8+-step row said "optional, a few percent" while the home page's row said something else.
    header = re.compile(r"^\|\s*your training\s*\|", re.I | re.M)
    carrying = [_rel(p) for p in PAGES if header.search(p.read_text(encoding="utf-8"))]
    assert sorted(carrying) == sorted(decision_table.PAGES), carrying


@pytest.mark.parametrize("page", DATA["advice_pages"])
def test_advice_pages_link_the_table(page):
    path = DOCS / page
    depth = len(Path(page).parts) - 1
    target = "../" * depth + "index.md#should-you-turn-it-on"
    assert f"]({target})" in path.read_text(encoding="utf-8"), f"{page}: link {target}"


@pytest.mark.parametrize("retired", DATA["retired"], ids=[r["pattern"][:40] for r in DATA["retired"]])
def test_no_page_makes_a_retired_claim(retired):
    pattern = re.compile(retired["pattern"], re.I)
    found = [_rel(p) for p in PAGES if pattern.search(_joined(p))]
    assert not found, f"{found}: {retired['pattern']!r} contradicts the decision table ({retired['why']})"


def test_one_recommended_scope_everywhere():
    # "scope='local' ... a sound default" (Choosing a method) and "scope='auto' ... the right
    # default" (When does it help?) stood beside the API default "global". A sentence that calls
    # another scope a default or recommends it is reported.
    other = re.compile(r"""scope=["'](local|node|auto)["'][^.]{0,80}\b(default|recommend)""", re.I)
    found = {_rel(p): m.group(0) for p in PAGES if (m := other.search(_joined(p)))}
    assert not found, found
    assert 'keep the default `scope="global"`' in DATA["scope"]


def test_the_retired_claims_are_caught_where_they_stood():
    # The detector itself, on the sentences these pages held before (from git history): each must
    # match one retired pattern, so a pattern that matches nothing cannot pass silently.
    old = [
        "| any of these, judged by training speed | no speed-up measured | DDIM and consistency |",
        "| flow matching, sampled in 8+ steps | optional | a few percent better, or no detectable change |",
        "a few percent (-5 to -26 % on images, none detected on 2-D and MNIST 14x14)",
        "Expect it to keep few-step samples from degrading as training goes on more than to reach a "
        "given quality in fewer steps",
        "keep it if it is cheap in your setting, but do not expect a faster convergence of a many-step "
        "sampler from it.",
        "OT pairs helped flow matching most at 1-2 sampler steps and little at 8",
        'So per-rank pools (`scope="local"`) of 64 or more are a sound default',
    ]
    patterns = [re.compile(r["pattern"], re.I) for r in DATA["retired"]]
    for sentence in old:
        assert any(p.search(sentence) for p in patterns), sentence
