"""``.dockerignore`` as ``docker build`` reads it (moby's ``patternmatcher`` and
``ignorefile``), pure: which paths of a build context stay out of it.

The rules: one pattern a line; a line starting with ``#`` is a comment; surrounding blanks
are trimmed; ``!`` makes an exception; a pattern is cleaned (``a/./b/`` is ``a/b``) and a
leading ``/`` dropped; ``*`` is any run of characters but ``/``, ``?`` one such character,
``[...]`` a class, ``\\`` escapes, and ``**`` any number of whole directories (``**/x``,
``a/**/x``, ``a/**``). A path is left out when the last pattern that matches it, or one of its
parent directories, is not an exception. Patterns only leave paths out of the context Den
walks, which never leaves the repository; an exception cannot bring anything else in.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

NAME = ".dockerignore"
MAX_BYTES = 64 * 1024
_SPECIAL = set(".+()|{}$")


@dataclass(frozen=True)
class Pattern:
    text: str
    exception: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    """moby's translation of a pattern into a regular expression, step for step."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":  # "**/" is "**"
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch in _SPECIAL:
            out.append("\\" + ch)
        elif ch == "\\":
            if i < n:
                out.append("\\" + pattern[i])
                i += 1
            else:
                out.append("\\\\")
        else:  # "[" and "]" make a class, as in Go's regexp
            out.append(ch)
    try:
        return re.compile("".join(out) + "$")
    except re.error as exc:
        raise ValueError(f"bad pattern {pattern!r} ({exc})") from None


def parse(text: str) -> list[Pattern]:
    """The patterns of a ``.dockerignore``, in order. Raises ValueError for a bad one."""
    out: list[Pattern] = []
    for number, raw in enumerate(text.splitlines()):
        line = raw.removeprefix("\ufeff") if number == 0 else raw
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        if line:
            line = posixpath.normpath(line)
            if line.startswith("//"):  # normpath keeps a leading "//"
                line = "/" + line.lstrip("/")
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        out.append(Pattern(text=line, exception=exception, regex=_compile(line)))
    return out


class Ignore:
    """Which paths (relative to the context, ``/``-separated) the patterns leave out."""

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns

    def excluded(self, path: str) -> bool:
        parents = path.split("/")[:-1]
        left_out = False
        for p in self.patterns:
            if p.exception != left_out:  # only a match could change the answer
                continue
            match = p.regex.match(path) is not None or any(
                p.regex.match("/".join(parents[:i + 1])) is not None
                for i in range(len(parents)))
            if match:
                left_out = not p.exception
        return left_out

    def may_hold_exceptions(self, directory: str) -> bool:
        """Whether the walk must look inside the left-out ``directory``: as docker does,
        when an exception's pattern starts with it (``!build/keep`` for ``build``)."""
        prefix = directory + "/"
        return any(p.exception and (p.text + "/").startswith(prefix) for p in self.patterns)
