"""Many images at once: the order `./build.py all` builds them in, and `./build.py plan`, which
says for each whether it is up to date or what changed, without building anything (README.md,
"Many images: plan and all").

An image is built after the images it needs: its parent (image.yaml `parent`: it starts from
the parent's disk) and the image it embeds (`payload.image`), when that one is built in the
same run. Naming a child builds its parents too (a layer on a stale parent is not what was
asked for); an embedded image is not added: the embedding takes the release's recorded file,
which a build alone does not change. Without names, every folder under images/ is selected,
and an image that cannot build with these options (usb-installer without --release) is listed
as not built instead of failing the run.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from osimage import config, runner
from osimage.build import gitstate, inputs, pipeline, uptodate
from osimage.build.context import BuildOptions
from osimage.errors import ConfigError, FactoryError
from osimage.ui import Reporter, table


@dataclass(frozen=True)
class Node:
    """One selected image, with what it is built after."""

    name: str
    parent: str | None
    embeds: str | None
    needs: tuple[str, ...]  # the selected images it is built after
    added_for: str | None = None  # not named: the parent of this named image
    refused: str | None = None  # why it is not built with these options

    @property
    def parents(self) -> tuple[str, ...]:
        return (self.parent,) if self.parent in self.needs else ()

    def relation(self, other: str) -> str:
        return "parent" if other == self.parent else "embedded image"


def _needs(root: Path, name: str, known: list[str]) -> tuple[str | None, str | None]:
    """The image's parent and the image it embeds, as its image.yaml names them."""
    data = config.load_image(root, name).data
    parent = data.get("parent")
    if parent is not None and parent not in known:
        raise ConfigError(f"images/{name}/image.yaml: parent: no image folder images/{parent}/ "
                          f"(known images: {', '.join(known)})")
    embeds = (data.get("payload") or {}).get("image")
    return parent, embeds


def _order(found: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """Every image after what it needs, otherwise by name; a cycle of parents is refused."""
    needs = {n: {d for d in found[n] if d in found and d != n} for n in found}
    ready = [n for n in found if not needs[n]]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        out.append(name)
        for other in found:
            if name in needs[other]:
                needs[other].discard(name)
                if not needs[other]:
                    heapq.heappush(ready, other)
    if len(out) < len(found):
        start = min(n for n in found if n not in out)
        cycle = [start]
        while (nxt := min(needs[cycle[-1]])) not in cycle:
            cycle.append(nxt)
        cycle.append(nxt)
        # parents alone cannot loop (config.load_image refuses it): an embedded image is in it
        raise ConfigError(f"images/{start}/image.yaml: parent, payload.image: a cycle of "
                          f"images each built before the next: "
                          f"{' -> '.join(reversed(cycle[cycle.index(nxt):]))}")
    return out


def select(root: Path, names: Sequence[str],
           options: Callable[[str], BuildOptions]) -> list[Node]:
    """The images to build, in order: the named ones (default: every image) and their parents.
    A named image the options cannot build is an error (exit 2); without names it is listed
    as refused, and so is whatever needs it."""
    known = config.list_images(root)
    named = list(dict.fromkeys(names)) if names else known
    found: dict[str, tuple[str | None, str | None]] = {}
    added_for: dict[str, str] = {}
    todo = list(named)  # the named ones first: an unknown name is the error (exit 2)
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        found[name] = _needs(root, name, known)
        parent = found[name][0]
        if parent is not None and parent not in named and parent not in added_for:
            added_for[parent] = name
            todo.append(parent)
    nodes: dict[str, Node] = {}
    for name in _order(found):
        parent, embeds = found[name]
        needs = tuple(d for d in (parent, embeds) if d is not None and d in found)
        refused = next((f"its {'parent' if d == parent else 'embedded image'} {d} is not built"
                        for d in needs if nodes[d].refused), None)
        if refused is None:
            try:
                pipeline.check_options(root, options(name))
            except ConfigError as e:
                if names:
                    raise
                refused = e.message
        nodes[name] = Node(name, parent, embeds, needs, added_for.get(name), refused)
    return list(nodes.values())


class _Silent(Reporter):
    """What a build would print while it is prepared: plan says it its own way."""

    def __init__(self) -> None:
        super().__init__(quiet=True)

    def warn(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class Row:
    node: Node
    builds: bool
    text: str


def judge(root: Path, nodes: list[Node], options: Callable[[str], BuildOptions]) -> list[Row]:
    """For each image, in order: up to date, or why it builds, as its build would decide (a
    child of a parent that builds first builds too: the parent's new disk is its input)."""
    rows: dict[str, Row] = {}
    for node in nodes:
        opts = options(node.name)
        if node.refused is not None:
            rows[node.name] = Row(node, False, f"not built: {node.refused}")
            continue
        rebuilt = [p for p in node.parents if rows[p].builds]
        if rebuilt and opts.release is None:
            rows[node.name] = Row(node, True, f"builds after its parent {rebuilt[0]}, whose "
                                  "new disk is an input")
            continue
        try:
            ctx = pipeline.start(root, replace(opts, skip_commit=True), _Silent())
        except ConfigError as e:
            rows[node.name] = Row(node, True, f"cannot start: {e.message}")
            continue
        verdict = uptodate.judge(ctx, dirty_ok=True)
        rows[node.name] = Row(node, not verdict.fresh, verdict.plan + _files(root, node, verdict))
    return list(rows.values())


def _files(root: Path, node: Node, verdict: uptodate.Verdict) -> str:
    """The files of a changed folder input that git says differ from the recorded build's
    commit (nothing when that commit is not in this clone)."""
    folders = {inputs.IMAGE_FOLDER: f"images/{node.name}", inputs.TEMPLATES: "templates"}
    paths = [folders[c.name] for c in verdict.changes if c.name in folders]
    if not paths or verdict.commit is None:
        return ""
    try:
        out = runner.output(["git", "-C", str(root), "diff", "--name-only", "--no-renames",
                             verdict.commit, "--", *paths], what="git diff")
    except FactoryError:
        return ""
    names = [n for n in out.splitlines() if not n.endswith("/manifest.json")]
    if not names:
        return ""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f" ({', '.join(names[:5])}{more})"


def show(root: Path, names: Sequence[str], release: str | None,
         site_file: Path | None) -> list[str]:
    """./build.py plan: the build order and, for each image, what `all` would do."""
    def options(name: str) -> BuildOptions:
        return BuildOptions(image=name, release=release, site_file=site_file)

    nodes = select(root, names, options)
    state = gitstate.read_state(root)
    version = gitstate.version_for(state, release)
    rows = judge(root, nodes, options)
    built = [r for r in rows if r.node.refused is None]
    out = [f"plan for {len(built)} image{'s' if len(built) != 1 else ''}, version {version} "
           f"(commit {state.short}{', --release ' + release if release else ''}), "
           "in build order:"]
    if state.dirty:
        out.append(f"the tree is dirty ({len(state.dirty_files)} changed files): `all` needs "
                   "--skip-commit and then builds every image (a dirty build is never up to "
                   "date); below, the working tree against each image's recorded build")
    listed = [(str(i + 1), r) for i, r in enumerate(built)]
    listed += [("-", r) for r in rows if r.node.refused is not None]
    out += table(["order", "image", "plan"],
                 [(order, _label(r.node), r.text) for order, r in listed])
    return out


def _label(node: Node) -> str:
    return node.name if node.added_for is None else f"{node.name} (parent of {node.added_for})"
