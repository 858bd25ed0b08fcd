"""The code's shape (issue 14): no import cycles and no module over ~600 lines in osimage/, the
pipeline walks the feature registry without naming a feature, no dead top-level code, every
imported distribution declared, and settings reach the code as arguments (never through
os.environ): `./build.py publish --accept-new-host-key` against a real sshd."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import PROJECT, build_py
from tests.servers import HTTPServer, SSHServer
from tests.test_immutable import errors_of, kept_build

PACKAGE = PROJECT / "osimage"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PROJECT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every osimage module `name` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            if base in known:
                yield base
            yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)


def test_no_import_cycles_and_no_large_module() -> None:
    modules = _modules()
    graph = {m: set(_imports(m, p, set(modules))) - {m} for m, p in modules.items()}
    cycles = []

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    for m in sorted(graph):
        for dep in sorted(graph[m]):
            if m in reach(dep):
                cycles.append(f"{m} <-> {dep}")
    assert cycles == []
    large = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert large == {}


def test_the_pipeline_names_no_feature() -> None:
    """build/ reaches the features only through their registry."""
    modules = _modules()
    for name in ("osimage.build.pipeline", "osimage.build.steps"):
        used = set(_imports(name, modules[name], set(modules)))
        assert {m for m in used if m.startswith("osimage.features.")} == {
            "osimage.features.registry"}, name
        text = modules[name].read_text()
        assert not re.search(r"(?<![\w-])(patches|payload|exports|httpdir|debug)\.", text), name


def test_a_new_feature_is_placed_by_its_anchors() -> None:
    """What one module adds (steps before/after core slots, skipped slots, publishing steps)
    lands where it says, and the options drop what they must."""
    from osimage.build.context import BuildOptions
    from osimage.build.feature import Step, assemble, select
    from osimage.build.steps import CORE

    def noop(ctx: object, stack: object) -> None:
        pass

    added = [Step("sbom", noop, at="after artifacts"),
             Step("push sbom", noop, at="after artifacts", publishes=True),
             Step("check layers", noop, at="before source")]
    names = [s.name for s in select(assemble(CORE, added, {"check published"}),
                                    BuildOptions(image="x"))]
    assert names == ["check up to date", "check mirror", "check release", "check layers",
                     "prepare source", "make build key", "render and validate HCL", "packer build",
                     "hash artifacts", "sbom", "push sbom", "publish to mirror",
                     "record in manifest.json"]
    quiet = select(assemble(CORE, added, set()), BuildOptions(image="x", publish=False))
    assert "push sbom" not in [s.name for s in quiet]


def test_no_dead_top_level_code() -> None:
    """Every module-level function, class and constant of osimage/ is used somewhere
    (osimage/, tests/, bench/, build.py) besides its definition; click commands excepted."""
    texts = [p.read_text() for d in ("osimage", "tests", "bench")
             for p in (PROJECT / d).rglob("*.py")] + [(PROJECT / "build.py").read_text()]
    # \bNAME\b matches exactly where a maximal run of word characters is NAME: count the runs
    # once instead of scanning the whole tree again for every name.
    uses = Counter(re.findall(r"\w+", "\n".join(texts)))
    unused = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                if any(isinstance(d, ast.Call) for d in getattr(node, "decorator_list", [])):
                    continue  # @cli.command(...), @click.option(...): click calls it
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("__") and uses[name] < 2:
                    unused.append(f"{path.relative_to(PROJECT)}: {name}")
    assert unused == []


def _top_level_imports(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module.split(".")[0])
    return out - set(sys.stdlib_module_names) - {"osimage", "tests", "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"],
             *(s for extra in project["optional-dependencies"].values() for s in extra)]
    return {re.split(r"[<>=!~\[ ;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_imported_distribution_is_declared() -> None:
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module in sorted(_top_level_imports(PACKAGE) | _top_level_imports(PROJECT / "tests")
                         | _top_level_imports(PROJECT / "bench")):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert missing == []


def test_publish_accept_new_host_key_is_an_argument(repo: Path, tmp_path: Path) -> None:
    """`./build.py publish IMAGE VERSION --accept-new-host-key` trusts the SSH mirror's new
    host key (it reaches the mirror as an argument; setting an environment variable nobody
    reads trusted nothing), and without the flag the key is refused."""
    kept_build(repo, "1.0", 1 << 20, b"host-key")
    known = tmp_path / "known_hosts"
    known.write_text("")
    with SSHServer() as ssh, HTTPServer(ssh.root) as http:
        site = tmp_path / "site.yaml"
        site.write_text(f"mirror:\n  url: {ssh.url}\n  http: {http.url}/\n"
                        f"  identity_file: {ssh.client_key}\n  known_hosts: {known}\n")
        refused = build_py(repo, "publish", "smoke", "1.0", "--site", str(site))
        assert refused.returncode == 1, refused.stderr
        [line] = errors_of(refused.stderr)
        assert "unknown host key" in line
        assert known.read_text() == ""
        trusted = build_py(repo, "publish", "smoke", "1.0", "--site", str(site),
                           "--accept-new-host-key")
        assert trusted.returncode == 0, trusted.stderr
        assert known.read_text() == f"{ssh.host_pattern} {ssh.host_public}\n"
        assert (ssh.root / "builds/smoke/1.0/smoke.qcow2").is_file()
