"""Griffe extension for the API pages: render the Sphinx roles used in docstrings as inline code.

The library's docstrings are Google style, with Sphinx cross-reference roles such as
``:class:`~lightning_memwatch.MemWatch``` (read by IDEs and Sphinx). mkdocstrings renders Markdown, where those
roles would show up verbatim; this extension rewrites them to inline code (``MemWatch``), turns RST's
``text::`` literal-block markers into ``text:`` and reads an ``Example:`` section as Google's ``Examples:``
(doctests rendered as code). Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings...extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|ref):`(~?)([^`]+)`")
_LITERAL_MARKER = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)
_EXAMPLE_HEADING = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)


def rewrite(text: str) -> str:
    """Rewrite Sphinx roles as inline code; ``~a.b.C`` keeps only ``C``, as Sphinx displays it."""

    def role(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        target = target.strip()
        if "<" in target and target.endswith(">"):  # :class:`text <target>`
            target = target.split("<", 1)[0].strip()
        elif tilde:
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    text = _LITERAL_MARKER.sub(r"\1:", _ROLE.sub(role, text))
    # Google style's "Examples:" section holds doctests (rendered as code); a singular "Example:" would be
    # parsed as Markdown prose, where `x["key"]` reads as a reference link.
    return _EXAMPLE_HEADING.sub(r"\1Examples:", text)


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite each docstring once its object exists."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
