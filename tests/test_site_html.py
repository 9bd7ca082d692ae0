"""The built docs site as a reader meets it: rendering, links, navigation, offline assets.

The site is built once per test session (``mkdocs build --strict``, warnings are errors) and the
HTML of every page is checked for what a strict build does not catch: Markdown that was not
rendered, Sphinx markup in docstrings, content that cannot scroll inside the column, links and
images that lead nowhere (served, and opened from disk as ``site/index.html``), pages no navigation
reaches, and assets fetched from the network.

Each check was tried once against a deliberately broken page, see the comment at each test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
FENCE_LANGUAGES = {"python", "py", "bash", "sh", "shell", "console", "yaml", "yml", "json", "toml", "text"}
SPHINX_ROLE = re.compile(r":(func|class|meth|data|mod|attr|obj|exc|ref|doc|py:\w+):`?")


@dataclass(eq=False, repr=False)
class Node:
    """One element of a parsed page (the parts of a DOM these checks need)."""

    tag: str
    attrs: dict[str, str]
    parent: Node | None = None
    children: list[Node | str] = field(default_factory=list)

    def __repr__(self) -> str:  # the tree links both ways: the default repr would recurse
        return f"<{self.tag} {self.attrs}>"

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self, tag: str | None = None):
        """This node and its descendants (elements only), in document order."""
        if tag is None or self.tag == tag:
            yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter(tag)

    def text(self, skip: frozenset[str] = frozenset()) -> str:
        """The text inside, leaving out the subtrees whose tag is in ``skip``."""
        return "".join(
            c if isinstance(c, str) else ("" if c.tag in skip else c.text(skip)) for c in self.children
        )

    def ancestors(self):
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:  # tolerate unclosed <p>, <li>
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


@dataclass
class Page:
    """A built page: its path under the site, its URL path, and its parsed document."""

    path: Path
    url: str
    doc: Node

    @property
    def content(self) -> Node:
        """The page body a reader reads (Material's ``<article>``), without navigation."""
        return next(n for n in self.doc.iter("article") if "md-content__inner" in n.classes)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once per session, strictly (a warning fails the build)."""
    out = tmp_path_factory.mktemp("site") / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def load_pages(site: Path) -> list[Page]:
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site).as_posix()
        if rel == "404.html":
            continue
        url = "/" + rel.removesuffix("index.html")
        pages.append(Page(path, url, parse(path.read_text(encoding="utf-8"))))
    return pages


@pytest.fixture(scope="session")
def pages(site: Path) -> list[Page]:
    return load_pages(site)


# ---- the checks, as functions of one page (so that each can be tried on a broken page) ----------

PROSE = ("p", "li", "td", "th", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "figcaption", "summary")
NOT_PROSE = frozenset({"code", "pre", "script", "style", "kbd", "svg"})


def prose_blocks(page: Page):
    """Rendered text blocks (paragraphs, list items, cells, headings) without their code."""
    for node in page.content.iter():
        if node.tag in PROSE and not any(a.tag in NOT_PROSE for a in node.ancestors()):
            yield node, node.text(skip=NOT_PROSE)


def unrendered_markdown(page: Page) -> list[str]:
    """Markdown that reached the reader as text: fences, fence languages, tables, links, emphasis."""
    found = []
    for node, text in prose_blocks(page):
        first_line = text.strip().split("\n", 1)[0].strip()
        if "```" in text or "~~~" in text:
            found.append(f"code fence in <{node.tag}>: {text.strip()[:80]!r}")
        elif first_line in FENCE_LANGUAGES and node.tag in ("p", "li") and "\n" in text.strip():
            found.append(f"fence language line in <{node.tag}>: {text.strip()[:80]!r}")
        elif re.search(r"\]\([^)\s]*\)|\]\[[\w.]*\]", text):
            found.append(f"unrendered link in <{node.tag}>: {text.strip()[:80]!r}")
        elif re.search(r"(^|\s)\|[^|\n]*\|[^|\n]*\||\|\s*:?-{3,}", text):
            found.append(f"unrendered table in <{node.tag}>: {text.strip()[:80]!r}")
        elif re.search(r"\*\*|(^|\s)\*(\s|$)|^#{1,6}\s", text.strip()):
            found.append(f"stray emphasis, list or heading mark in <{node.tag}>: {text.strip()[:80]!r}")
    for node in page.content.iter():
        for before, child in zip(node.children, node.children[1:], strict=False):
            # "W*b and W*c" renders as W<em>b and W</em>c: emphasis glued to a word is a stray "*"
            if isinstance(before, str) and isinstance(child, Node) and child.tag in ("em", "strong"):
                if re.search(r"\w\Z", before) and re.match(r"\w", child.text()):
                    found.append(
                        f"emphasis inside a word (a stray '*'?): {before[-20:] + child.text()[:40]!r}"
                    )
    for code in page.content.iter("code"):
        lines = code.text().strip().split("\n")
        if (
            len(lines) > 1
            and lines[0].strip() in FENCE_LANGUAGES
            and not any(a.tag == "pre" for a in code.ancestors())
        ):
            found.append(f"code block rendered as inline code: {code.text().strip()[:80]!r}")
    return found


def sphinx_markup(page: Page) -> list[str]:
    """Sphinx/reST roles and ``Example::``-style double colons in the rendered text."""
    text = page.content.text(skip=frozenset({"script", "style"}))
    prose = page.content.text(skip=NOT_PROSE)
    roles = [m.group(0) for m in SPHINX_ROLE.finditer(text)]
    colons = [
        " ".join(prose[max(0, m.start() - 40) : m.end()].split()) for m in re.finditer(r"\w::(\s|$)", prose)
    ]
    return roles + colons


def unscrollable_blocks(page: Page) -> list[str]:
    """Tables and code blocks that would widen the column instead of scrolling inside it.

    Material's CSS scrolls a highlighted ``pre > code`` inside the column, and its script wraps
    every ``table:not([class])`` in a scrolling ``div.md-typeset__scrollwrap`` (checked below on
    the theme's bundle). A ``<pre>`` outside ``div.highlight`` (an indented or unrendered block),
    or a table carrying a class (the script skips it) and no wrapper, is not covered.
    """
    found = []
    for pre in page.content.iter("pre"):
        parent_classes = pre.parent.classes if pre.parent else set()
        if "highlight" not in parent_classes or not any(c.tag == "code" for c in pre.iter()):
            found.append(f"<pre> outside a highlighted block: {pre.text()[:60]!r}")
    for table in page.content.iter("table"):
        wrapped = any("md-typeset__scrollwrap" in a.classes for a in table.ancestors())
        if "class" in table.attrs and not wrapped:
            found.append(f"table with class {table.attrs['class']!r} and no scroll wrapper")
    return found


def broken_links(page: Page, site: Path, ids: dict[str, set[str]]) -> list[str]:
    """Internal links and images whose file, or whose #anchor on that page, does not exist."""
    found = []
    for node in page.doc.iter():
        ref = node.attrs.get("href") if node.tag in ("a", "link") else node.attrs.get("src")
        if node.tag not in ("a", "link", "img", "script") or ref is None:
            continue
        parts = urlsplit(urljoin(page.url, ref))
        if parts.scheme or parts.netloc:
            continue
        target = site / unquote(parts.path).lstrip("/")
        if target.is_dir() or parts.path.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            found.append(f"<{node.tag}> {ref!r}: no file {target.relative_to(site)}")
        elif parts.fragment and target.suffix == ".html":
            key = "/" + target.relative_to(site).as_posix().removesuffix("index.html")
            if unquote(parts.fragment) not in ids.get(key, set()):
                found.append(f"<{node.tag}> {ref!r}: no anchor #{parts.fragment} on {key}")
    return found


def links_broken_from_disk(page: Page, site: Path) -> list[str]:
    """Internal links and assets that a browser cannot open when the page is read from disk (file://).

    A web server turns ``user-guide/`` into ``user-guide/index.html``; a browser reading files does
    not (it shows a directory listing, or nothing). So every internal reference must name a file.
    """
    found = []
    for node in page.doc.iter():
        ref = node.attrs.get("href") if node.tag in ("a", "link") else node.attrs.get("src")
        if node.tag not in ("a", "link", "img", "script") or not ref:
            continue
        parts = urlsplit(ref)
        if parts.scheme or parts.netloc or not parts.path:  # external, or an anchor on this page
            continue
        target = (page.path.parent / unquote(parts.path)).resolve()
        if parts.path.endswith("/") or target.is_dir():
            found.append(f"<{node.tag}> {ref!r}: a directory, not a file")
        elif not target.is_file() or not target.is_relative_to(site.resolve()):
            found.append(f"<{node.tag}> {ref!r}: no file {target}")
    return found


def remote_assets(page: Page) -> list[str]:
    """Scripts, stylesheets, fonts and images the page would fetch from the network to render."""
    found = []
    for node in page.doc.iter():
        ref = node.attrs.get("src") if node.tag in ("script", "img") else None
        if node.tag == "link" and node.attrs.get("rel") in ("stylesheet", "preload", "preconnect"):
            ref = node.attrs.get("href")
        if ref and urlsplit(ref).scheme in ("http", "https", ""):
            if urlsplit(ref).netloc:
                found.append(f"<{node.tag}> {ref}")
    return found


def nav_targets(page: Page) -> set[str]:
    """The URL paths the primary navigation of ``page`` links to."""
    nav = next(n for n in page.doc.iter("nav") if "md-nav--primary" in n.classes)
    return {
        urlsplit(urljoin(page.url, a.attrs["href"])).path.removesuffix("index.html")
        for a in nav.iter("a")
        if "href" in a.attrs and not urlsplit(a.attrs["href"]).netloc
    }


def page_ids(pages: list[Page]) -> dict[str, set[str]]:
    return {p.url: {n.attrs["id"] for n in p.doc.iter() if "id" in n.attrs} for p in pages}


# ---- the tests ------------------------------------------------------------------------------------


def test_site_builds_strictly(site: Path):
    """The MkDocs site (API reference from docstrings included) builds with warnings as errors."""
    assert (site / "index.html").is_file()
    assert (site / "reference" / "callback.html").is_file()


def test_no_unrendered_markdown(pages: list[Page]):
    # Tried once on the site built with the previous setup (theme "mkdocs", default Markdown): the
    # user guide's ```yaml fence inside a list item came out as inline code starting "yaml" and was
    # reported; so were, on an extra page, a table without the blank line before it and a "**" left
    # open; and on the performance page as it was, "while W*b stays ... larger W*b" (rendered as
    # W<em>b ... W</em>b) was reported as emphasis inside a word.
    found = {p.url: f for p in pages if (f := unrendered_markdown(p))}
    assert not found, found


def test_no_sphinx_markup(pages: list[Page]):
    # Tried on the API reference before the docstrings were converted: 34 roles (:func:, :class:,
    # :meth:, :data:, :mod:) and "Example::" were reported.
    found = {p.url: f for p in pages if (f := sphinx_markup(p))}
    assert not found, found


def test_tables_and_code_blocks_scroll_inside_the_column(pages: list[Page], site: Path):
    # Tried with theme "mkdocs" (no Material bundle; its <pre> blocks are not highlighted: reported)
    # and with a raw-HTML <table class="wide"> on an extra page: reported.
    bundles = [s for s in site.glob("assets/javascripts/bundle.*.min.js")]
    assert bundles, "the Material theme's script (which wraps tables in a scroll container) is missing"
    script = bundles[0].read_text(encoding="utf-8")
    assert "md-typeset__scrollwrap" in script and "table:not([class])" in script
    found = {p.url: f for p in pages if (f := unscrollable_blocks(p))}
    assert not found, found


def test_internal_links_and_images_resolve(pages: list[Page], site: Path):
    # Tried on an extra page with an HTML link to a missing page, an <img> whose file does not exist
    # and a Markdown link to an anchor no heading has: all three reported (the strict build does not
    # see links written as HTML).
    ids = page_ids(pages)
    found = {p.url: f for p in pages if (f := broken_links(p, site, ids))}
    assert not found, found


def test_the_site_works_opened_from_disk(pages: list[Page], site: Path):
    # Opening site/index.html from disk is how the docs are read without a hosted site. Tried with
    # use_directory_urls left at its default: every internal link ("user-guide/") was reported; and
    # without the offline plugin: no search_index.js, and search never started.
    found = {p.url: f for p in pages if (f := links_broken_from_disk(p, site))}
    assert not found, found
    # Search from file://: the index as a script (a page cannot fetch() a file), and the Web Worker
    # shim the offline plugin loads, from the site itself.
    assert (site / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index = ")
    home = next(p for p in pages if p.url == "/")
    scripts = [n.attrs["src"] for n in home.doc.iter("script") if "src" in n.attrs]
    assert "javascripts/iframe-worker-shim.js" in scripts, scripts


def test_every_page_is_in_the_navigation(pages: list[Page]):
    # Tried with an extra page left out of mkdocs.yml's nav: reported.
    home = next(p for p in pages if p.url == "/")
    reachable = nav_targets(home)
    missing = [p.url for p in pages if p.url not in reachable]
    assert not missing, f"add these pages to the nav in mkdocs.yml: {missing}"


def test_nothing_is_fetched_from_the_network(pages: list[Page]):
    # Tried with theme.font left at its default (Google Fonts) and with theme "mkdocs" (highlight.js
    # from a CDN): both reported.
    found = {p.url: f for p in pages if (f := remote_assets(p))}
    assert not found, found


def test_api_reference_reads_as_intended(pages: list[Page]):
    """Objects under the import path users write, signatures apart from headings, one Returns."""
    ref = {p.url: p for p in pages if p.url.startswith("/reference/")}
    callback = ref["/reference/callback.html"].content
    ids = {n.attrs.get("id") for n in callback.iter()}
    assert "lightning_immiscible.ImmiscibleCoupling" in ids  # not ...callback.ImmiscibleCoupling
    # the constructor's arguments are on the class (merge_init_into_class), in its own signature block
    signature = next(n for n in callback.iter("div") if "doc-signature" in n.classes).text()
    assert "ImmiscibleCoupling(" in signature and "method" in signature and "scope" in signature
    coupling = ref["/reference/coupling.html"].content
    returns = [
        n
        for n in coupling.iter()
        if "doc-section-title" in n.classes and n.text().strip().startswith("Returns")
    ]
    assert returns, "couple() has a Returns section"
    title = returns[0].parent  # <p><span class="doc-section-title">Returns:</span></p>, then its list
    siblings = [c for c in title.parent.children if isinstance(c, Node)]
    items = list(siblings[siblings.index(title) + 1].iter("li"))
    # Caught (seen before the fix): griffe naming the value "A" from "A :class:`CouplingResult`",
    # or splitting a Returns sentence that wraps over lines into one item per line.
    assert len(items) == 1, [li.text().strip()[:60] for li in items]
    assert not list(items[0].iter("b")), f"the return value got a name: {items[0].text()[:60]!r}"


# Names that are internal (not in the package root or the documented modules' public lists): they
# belong on the reference's "Internals" page only.
INTERNAL_IDS = (
    "lightning_immiscible.solver_race.SolverRace",
    "lightning_immiscible.protocol.HEADER_SIZE",
    "lightning_immiscible.protocol.REASONS",
    "lightning_immiscible.groups.place",
    "lightning_immiscible.callback.LARGE_POOL",
    "lightning_immiscible.coupling.assign",
)


def test_api_reference_signatures_returns_choices_and_public_names(pages: list[Page]):
    ref = {p.url: p.content for p in pages if p.url.startswith("/reference/")}
    # Signatures are formatted and wrapped (ruff, line_length 80). Caught: without the formatter in the
    # docs extra, ImmiscibleCoupling's signature was one 341-character line, cut off on screen.
    for url, content in ref.items():
        for sig in (n for n in content.iter("div") if "doc-signature" in n.classes):
            longest = max(sig.text().splitlines(), key=len)
            assert len(longest) <= 90, f"{url}: {longest!r}"
    # Returns entries render their Markdown. Caught: the default template printed a prose return
    # "type" such as "`(B, *dims)` noise on `x0`'s device" with its backticks, inside a code span.
    for url, content in ref.items():
        for title in (n for n in content.iter() if "doc-section-title" in n.classes):
            if title.text().strip().startswith("Returns"):
                siblings = [c for c in title.parent.parent.children if isinstance(c, Node)]
                listing = siblings[siblings.index(title.parent) + 1]
                text = listing.text(skip=frozenset({"pre"}))
                assert "`" not in text and "][" not in text, f"{url}: {text.strip()[:120]!r}"
    # The Literal aliases show their allowed values, and the signatures link to them.
    coupling = ref["/reference/coupling.html"]
    method = next(n for n in coupling.iter() if n.attrs.get("id") == "lightning_immiscible.coupling.Method")
    block = method.parent.text()
    assert all(f"'{v}'" in block for v in ("lsa", "knn", "flip", "none")), block[:200]
    callback_links = {a.attrs.get("href", "") for a in ref["/reference/callback.html"].iter("a")}
    assert "coupling.html#lightning_immiscible.coupling.Method" in callback_links
    # Public names only on the public pages; internals on their own page. Caught: SolverRace,
    # the header constants and INPUT_ERROR_REASONS standing beside couple() and the callback.
    for url, content in ref.items():
        ids = {n.attrs.get("id") for n in content.iter()}
        shown = [i for i in INTERNAL_IDS if i in ids]
        assert shown == ([*INTERNAL_IDS] if url == "/reference/internals.html" else []), (url, shown)
    assert "CouplingSpec" in ref["/reference/"].text()


# ---- the detectors themselves, fed known bad and good HTML (no site build) ------------------------
# Each must report the broken page and stay silent on the good one: a detector that returns nothing
# would otherwise keep every site test above green whatever the site looks like.


def _page(body: str, url: str = "/guide/", head: str = "") -> Page:
    html = (
        f"<html><head>{head}</head><body><nav class='md-nav md-nav--primary'>"
        "<a href='/guide/'>Guide</a><a href='../other/'>Other</a></nav>"
        f"<article class='md-content__inner'>{body}</article></body></html>"
    )
    return Page(Path("guide/index.html"), url, parse(html))


GOOD = (
    "<p>Plain <em>prose</em> with <a href='#top'>a link</a>.</p>"
    "<div class='highlight'><pre><code>x = 1</code></pre></div>"
)


@pytest.mark.parametrize(
    "bad",
    [
        "<p>```python x = 1 ```</p>",
        "<p>see [the guide](guide.md) here</p>",
        "<p>| a | b |\n|---|---|</p>",
        "<p>a **bold** claim</p>",
        "<p>W<em>b and W</em>c</p>",
        "<p><code>python\nx = 1</code></p>",
    ],
    ids=["fence", "link", "table", "emphasis", "emphasis_in_word", "inline_code_block"],
)
def test_the_markdown_detector_reports_unrendered_markdown(bad):
    assert unrendered_markdown(_page(bad)), bad
    assert unrendered_markdown(_page(GOOD)) == []


def test_the_sphinx_detector_reports_roles_and_double_colons():
    assert sphinx_markup(_page("<p>Use :func:`couple` here.</p>"))
    assert sphinx_markup(_page("<p>Example::</p>"))
    assert sphinx_markup(_page(GOOD)) == []


def test_the_scroll_detector_reports_bare_pre_and_classed_tables():
    assert unscrollable_blocks(_page("<pre>indented block</pre>"))
    assert unscrollable_blocks(_page("<table class='wide'><tr><td>1</td></tr></table>"))
    wrapped = "<div class='md-typeset__scrollwrap'><table class='wide'><tr><td>1</td></tr></table></div>"
    assert unscrollable_blocks(_page(GOOD + wrapped)) == []


def test_the_link_detector_reports_missing_files_and_anchors(tmp_path):
    for name in ("guide", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.html").write_text("<p id='top'>x</p>")
    ids = {"/guide/": {"top"}}
    assert broken_links(_page("<a href='../missing/'>x</a>"), tmp_path, ids)
    assert broken_links(_page("<a href='#nowhere'>x</a>"), tmp_path, ids)
    assert broken_links(_page("<img src='pic.png'>"), tmp_path, ids)
    assert (
        broken_links(_page("<a href='#top'>x</a><a href='https://example.org/'>x</a>"), tmp_path, ids) == []
    )


def test_the_from_disk_detector_reports_directory_links(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide.html").write_text("<p>x</p>")
    (tmp_path / "pic.png").write_bytes(b"")

    def at_root(body: str) -> Page:
        return Page(tmp_path / "index.html", "/", parse(f"<html><body>{body}</body></html>"))

    # served, "guide/" is guide/index.html; from disk it is a directory listing
    assert links_broken_from_disk(at_root("<a href='guide/'>x</a>"), tmp_path)
    assert len(links_broken_from_disk(at_root("<a href='guide'>x</a><img src='missing.png'>"), tmp_path)) == 2
    good = (
        "<a href='guide.html#top'>x</a><img src='pic.png'><a href='#top'>x</a><a href='https://e.org/'>x</a>"
    )
    assert links_broken_from_disk(at_root(good), tmp_path) == []


def test_the_remote_asset_detector_reports_cdn_scripts_and_fonts():
    assert remote_assets(_page("", head="<script src='https://cdn.example.org/x.js'></script>"))
    assert remote_assets(_page("", head="<link rel='stylesheet' href='https://fonts.example.org/f.css'>"))
    assert remote_assets(_page("<a href='https://example.org/'>a plain link is fine</a>")) == []


def test_the_navigation_reader_finds_the_primary_nav_links():
    assert nav_targets(_page(GOOD)) == {"/guide/", "/other/"}
