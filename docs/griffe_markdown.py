"""A Griffe extension (mkdocs.yml loads it): the docstrings' reST, as Markdown.

The package's docstrings are Google-style, read by ``help()`` and by Sphinx-minded
readers: cross-references are reST roles (``:func:`~batchnorm.accumulate```), formulas
``:math:`` roles or ``.. math::`` lines, and examples outside an ``Examples:`` section are
bare doctests. mkdocstrings renders docstrings as Markdown, where a role shows its
``:func:`` prefix and a ``>>>`` line becomes a nested quotation. :func:`markdown` rewrites
those three before Griffe parses the docstring; the source is left as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`name`, :class:`~a.b.Name` (Sphinx shows only "Name"), :math:`x`, ...
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const|math):`(~?)([^`]+)`")
MATH = re.compile(r"^(\s*)\.\. math:: (.+)$")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    """``text`` (a cleaned docstring) with its reST roles, math and bare doctests as Markdown.

    Examples:
        >>> markdown("Inside :func:`~batchnorm.accumulate`, :math:`m_t`.")
        'Inside `accumulate`, `m_t`.'
    """
    lines, out, i = ROLE.sub(_role, text).splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        math = MATH.match(line)
        if math:
            out.append(f"{math.group(1)}`{math.group(2)}`")
        elif line.startswith(">>>"):  # a bare doctest, up to the next blank line
            out.append("```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append("```")
            continue
        elif line.endswith("::") and not line.strip().startswith(".."):
            out.append(line[:-1])  # reST's literal-block marker; the block stays indented
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


class ReSTToMarkdown(griffe.Extension):
    """Rewrites every loaded docstring with :func:`markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
