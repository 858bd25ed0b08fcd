"""The git state a build starts from: commit, dirty files, and the version it gets."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from osimage.errors import ConfigError
from osimage.runner import child_env

# A build writes its record into images/NAME/manifest.json; that file is the build's output,
# not an input, so it never makes the tree dirty.
NOT_INPUTS = ("images/*/manifest.json",)
# \Z, not $: $ also matches before a trailing newline, and a name must match whole.
RELEASE = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z._+-]{0,63}\Z")


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty_files: list[str]

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_files)

    @property
    def short(self) -> str:
        return self.commit[:10]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL, env=child_env())
    except FileNotFoundError:
        raise ConfigError("git is not installed", hint="apt-get install -y git") from None


def find_root(start: Path) -> Path:
    """The top of the git work tree that holds the project."""
    proc = _git(start, "rev-parse", "--show-toplevel")
    if proc.returncode != 0:
        raise ConfigError(f"{start}: not inside a git repository; builds are recorded by commit",
                          hint="run from a clone of the osimage repository")
    return Path(proc.stdout.strip())


def read_state(root: Path) -> GitState:
    head = _git(root, "rev-parse", "--verify", "HEAD")
    if head.returncode != 0:
        if _git(root, "rev-parse", "--git-dir").returncode != 0:
            raise ConfigError(f"{root}: not inside a git repository; builds are recorded by commit")
        raise ConfigError(f"{root}: the repository has no commit yet; commit before building")
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if status.returncode != 0:
        raise ConfigError(f"git status failed: {status.stderr.strip()}")
    files: list[str] = []
    entries = status.stdout.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":
            i += 1  # the rename's source path follows
        if any(fnmatch(path, pat) for pat in NOT_INPUTS):
            continue
        files.append(path)
    return GitState(commit=head.stdout.strip(), dirty_files=sorted(files))


def version_for(state: GitState, release: str | None, suffix: str = "") -> str:
    """RELEASE (or g<commit> without one), with -dirty for a build from a dirty tree."""
    if release is not None and not RELEASE.match(release):
        raise ConfigError(f"--release: {release!r} is not a valid release name",
                          hint="letters, digits, '.', '_', '+' and '-', e.g. 2.4.0")
    base = release if release is not None else f"g{state.short}"
    if state.dirty:
        base += "-dirty"
    return base + suffix


def require_clean(state: GitState, skip_commit: bool) -> None:
    if state.dirty and not skip_commit:
        shown = state.dirty_files[:10]
        more = f" and {len(state.dirty_files) - 10} more" if len(state.dirty_files) > 10 else ""
        raise ConfigError(
            f"the git tree is dirty: {', '.join(shown)}{more}",
            hint="commit or stash these changes, or pass --skip-commit for a -dirty build",
        )
