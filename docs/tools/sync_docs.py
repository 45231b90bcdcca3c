"""Keep the docs readable on a code host: code and argument lists written into the pages, never only referenced.

Run ``python docs/tools/sync_docs.py`` after editing a snippet, ``recipes/README.md`` or a docstring;
``tests/test_docs.py`` fails, naming this command, when a page is out of date. Three kinds of generated block:

* **Snippets.** A fenced block right under ``<!-- snippet: FILE[:SECTION] -->`` holds the text of
  ``docs/snippets/FILE`` (or of its ``# --8<-- [start:SECTION]`` ... ``[end:SECTION]`` part, dedented), so the
  page shows the code itself while the tests still run the file. A block made only of pymdownx
  ``--8<-- "FILE"`` include lines is turned into that form.
* **Included pages.** Between ``<!-- include: PATH -->`` and ``<!-- end include -->`` stands the text of
  ``PATH`` (relative to the repository root), e.g. ``recipes/README.md`` in ``docs/paper.md``.
* **API summaries.** Between ``<!-- api-summary -->`` and ``<!-- end api-summary -->`` an API page lists each
  object of its ``::: name`` directives: its arguments (with defaults) and the first line of its docstring.
  The site renders the full reference under it (mkdocstrings); a code host shows the summary.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"

SNIPPET_MARK = re.compile(r"^<!--\s*snippet:\s*(?P<target>\S+)\s*-->\s*$")
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)[^\n]*$")
INCLUDE_LINE = re.compile(r'^\s*--8<--\s+"(?P<target>[^"]+)"\s*$')
SECTION_LINE = re.compile(r"^\s*#?\s*--8<--\s*\[(?:start|end):[\w-]+\]\s*$")
PAGE_START = re.compile(r"^<!--\s*include:\s*(?P<path>\S+)\s*-->\s*$")
PAGE_END = "<!-- end include -->"
API_START = "<!-- api-summary -->"
API_END = "<!-- end api-summary -->"
DIRECTIVE = re.compile(r"^:::\s+(?P<name>[\w.]+)\s*$")


def doc_pages() -> list[Path]:
    """Every Markdown page of the site (snippets and tools excluded)."""
    return sorted(p for p in DOCS.rglob("*.md") if SNIPPETS not in p.parents and DOCS / "tools" not in p.parents)


def snippet_text(target: str) -> str:
    """The text a page shows for ``FILE`` or ``FILE:SECTION`` (section markers dropped; sections dedented)."""
    name, _, section = target.partition(":")
    path = next((base / name for base in (SNIPPETS, ROOT) if (base / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"snippet {name!r} exists neither in docs/snippets/ nor in the repository root")
    lines = path.read_text().splitlines()
    if section:
        start = [i for i, line in enumerate(lines) if re.search(rf"--8<--\s*\[start:{re.escape(section)}\]", line)]
        end = [i for i, line in enumerate(lines) if re.search(rf"--8<--\s*\[end:{re.escape(section)}\]", line)]
        if len(start) != 1 or len(end) != 1 or end[0] <= start[0]:
            raise ValueError(f"section {section!r} of {path.name} needs one [start:...] and one [end:...] marker")
        lines = lines[start[0] + 1 : end[0]]
        lines = textwrap.dedent("\n".join(lines)).splitlines()
    lines = [line for line in lines if not SECTION_LINE.match(line)]
    return "\n".join(lines).strip("\n") + "\n"


def _fence_end(lines: list[str], start: int, indent: str, fence: str) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == fence and lines[j].startswith(indent):
            return j
    raise ValueError(f"unclosed code block at line {start + 1}")


def sync_snippets(text: str) -> str:
    """Snippet blocks filled from their files; include-only blocks converted to marked inline blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        opened = FENCE_OPEN.match(line)
        marked = SNIPPET_MARK.match(line)
        if marked and i + 1 < len(lines) and (fence := FENCE_OPEN.match(lines[i + 1])):
            end = _fence_end(lines, i + 1, fence["indent"], fence["fence"])
            body = textwrap.indent(snippet_text(marked["target"]), fence["indent"]).splitlines()
            out.extend([line, lines[i + 1], *body, lines[end]])
            i = end + 1
            continue
        if opened:
            end = _fence_end(lines, i, opened["indent"], opened["fence"])
            body = [b for b in lines[i + 1 : end] if b.strip()]
            targets = [INCLUDE_LINE.match(b) for b in body]
            if body and all(targets):
                for m in targets:
                    assert m is not None
                    out.append(f"{opened['indent']}<!-- snippet: {m['target']} -->")
                    out.append(line)
                    out.extend(textwrap.indent(snippet_text(m["target"]), opened["indent"]).splitlines())
                    out.append(lines[end])
                i = end + 1
                continue
            out.extend(lines[i : end + 1])
            i = end + 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def sync_pages(text: str) -> str:
    """``<!-- include: PATH -->`` regions refilled from ``PATH``."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = PAGE_START.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == PAGE_END), None)
        if end is None:
            raise ValueError(f"{lines[i]!r} has no {PAGE_END!r} after it")
        out.extend([lines[i], *(ROOT / m["path"]).read_text().strip("\n").splitlines(), lines[end]])
        i = end + 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _resolve(name: str) -> object:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _attribute_comment(name: str) -> str:
    """The ``#:`` comment above a module-level assignment ``NAME = ...`` (how mkdocstrings documents data)."""
    module_name, _, attr = name.rpartition(".")
    try:
        lines = inspect.getsource(importlib.import_module(module_name)).splitlines()
    except (ImportError, OSError, TypeError):
        return ""
    for i, line in enumerate(lines):
        if re.match(rf"^{re.escape(attr)}\s*(:[^=]*)?=", line):
            comments = []
            for previous in reversed(lines[:i]):
                if not previous.startswith("#:"):
                    break
                comments.insert(0, previous[2:].strip())
            return " ".join(comments)
    return ""


def _first_line(obj: object, name: str = "") -> str:
    if not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)):
        return _attribute_comment(name).replace("|", "\\|")
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return first.replace("|", "\\|")


def _arguments(obj: object) -> str:
    if inspect.ismodule(obj) or not callable(obj):
        return ""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    shown = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        value = p.default
        default = "" if value is p.empty else f"={value:.4g}" if isinstance(value, float) else f"={value!r}"
        if len(default) > 30:
            default = "=..."
        shown.append(f"`{prefix}{p.name}{default}`")
    return ", ".join(shown) if shown else "(none)"


def api_summary(page_text: str) -> str:
    """The summary table of the objects named by a page's ``::: name`` directives."""
    rows = ["| Object | Arguments | Summary |", "|---|---|---|"]
    for line in page_text.splitlines():
        m = DIRECTIVE.match(line)
        if not m:
            continue
        name = m["name"]
        obj = _resolve(name)
        kind = "module" if inspect.ismodule(obj) else "class" if inspect.isclass(obj) else ""
        label = f"`{name.rsplit('.', 1)[-1] if kind != 'module' else name}`" + (f" ({kind})" if kind else "")
        rows.append(f"| {label} | {_arguments(obj) or '-'} | {_first_line(obj, name)} |")
    return "\n".join(rows)


def sync_api(text: str) -> str:
    """The ``<!-- api-summary -->`` region refilled (added under the page title when missing)."""
    if not any(DIRECTIVE.match(line) for line in text.splitlines()):
        return text
    table = api_summary(text)
    block = f"{API_START}\n{table}\n{API_END}"
    if API_START in text:
        head, rest = text.split(API_START, 1)
        _, tail = rest.split(API_END, 1)
        return head + block + tail
    lines = text.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("# "))
    return "\n".join([*lines[: title + 1], "", block, *lines[title + 1 :]]) + ("\n" if text.endswith("\n") else "")


def synced(path: Path) -> str:
    """The page's text with every generated block up to date."""
    return sync_api(sync_pages(sync_snippets(path.read_text())))


def main(argv: list[str] | None = None) -> int:
    """Rewrite out-of-date pages (``--check``: only list them; exit 1 when any)."""
    check = "--check" in (argv or [])
    stale = []
    for page in doc_pages():
        new = synced(page)
        if new != page.read_text():
            stale.append(page.relative_to(ROOT))
            if not check:
                page.write_text(new)
    for path in stale:
        print(f"{'stale' if check else 'updated'}: {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
