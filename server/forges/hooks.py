"""Installing Den's git hooks (``git_hooks/``) into a fresh workspace clone, on the host,
before the clone is packed for the workspace.

A hook the repository already has is kept as ``<hook>.local`` and called first by Den's
(chained, never overwritten). The hooks read their settings from the clone's config
(``den.workspace``, ``den.protectedBranch``), which Den writes here. Only files are touched:
no git command runs against the clone.
"""

from __future__ import annotations

import os
from pathlib import Path

HOOKS_DIR = Path(__file__).resolve().parents[2] / "git_hooks"
HOOK_NAMES = ("commit-msg", "pre-push")
MARKER = "# den-hook"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def install_hooks(git_dir: Path, *, workspace: str, protected: list[str],
                  author: tuple[str, str] | None = None) -> None:
    """Install the hooks into ``git_dir/hooks`` and the settings into ``git_dir/config``;
    ``author`` (name, email) becomes the clone's ``user.name`` and ``user.email``."""
    hooks = git_dir / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in HOOK_NAMES:
        source = (HOOKS_DIR / name).read_text()
        target = hooks / name
        if target.is_symlink() or target.exists():
            try:
                ours = MARKER in target.read_text(errors="replace")
            except OSError:
                ours = False
            if not ours:
                os.replace(target, hooks / f"{name}.local")
        target.write_text(source)
        target.chmod(0o755)
    lines = ["[den]", f"\tworkspace = {_quote(workspace)}"]
    lines += [f"\tprotectedBranch = {_quote(p)}" for p in protected if p]
    if author is not None and all(author):
        lines += ["[user]", f"\tname = {_quote(author[0])}", f"\temail = {_quote(author[1])}"]
    with (git_dir / "config").open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
