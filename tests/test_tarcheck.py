"""What the host checks is what the VM unpacks: hostile archives crafted byte by byte (and with
real GNU tar) are refused, and every archive the check accepts, and its re-pack, lists and
unpacks the same under GNU tar, bsdtar (libarchive-tools) and busybox tar, with nothing outside
the extraction root and no setuid bit.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osimage.features import tarcheck

TARS = {"gnu": ["tar"], "bsdtar": ["bsdtar"], "busybox": ["busybox", "tar"]}
ENV = {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}
BLOCK = 512


def _need_tars() -> None:
    missing = [n for n, argv in TARS.items() if shutil.which(argv[0]) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: scripts/setup.sh installs them")


# --- crafting archives byte by byte -------------------------------------------------------------


def header(name: bytes | str, *, size: int = 0, mode: int = 0o644, flag: bytes = b"0",
           linkname: bytes | str = b"", magic: bytes = b"ustar\x0000", prefix: bytes = b"",
           size_field: bytes | None = None, signed: bool = False, tail: bytes = b"") -> bytes:
    """One 512-byte header with a correct checksum (signed: as old tars computed it)."""
    name = name.encode() if isinstance(name, str) else name
    linkname = linkname.encode() if isinstance(linkname, str) else linkname
    b = bytearray(BLOCK)
    b[0:len(name)] = name
    b[100:108] = b"%07o\x00" % mode
    b[108:116] = b"0000000\x00"
    b[116:124] = b"0000000\x00"
    b[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    b[136:148] = b"14652034000\x00"
    b[156:157] = flag
    b[157:157 + len(linkname)] = linkname
    b[257:265] = magic
    b[265:269] = b"root"
    b[297:301] = b"root"
    b[345:345 + len(prefix)] = prefix
    b[500:500 + len(tail)] = tail
    b[148:156] = b" " * 8
    total = sum((x - 256 if x > 127 else x) for x in b) if signed else sum(b)
    b[148:156] = b"%06o\x00 " % total
    return bytes(b)


def data(body: bytes) -> bytes:
    return body + bytes(-len(body) % BLOCK)


def pax(records: dict[str, str], flag: bytes = b"x") -> bytes:
    text = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        n = len(rec) + len(str(n))
        text += str(n).encode() + rec
    return header("PaxHeaders/x", size=len(text), flag=flag) + data(text)


def member(name: str, body: bytes = b"", mode: int = 0o644, **kw: object) -> bytes:
    return header(name, size=len(body), mode=mode, **kw) + data(body)  # type: ignore[arg-type]


END = bytes(2 * BLOCK)
ADV = member("advisories.txt", b"X-1:1 Important/Sec. p-1.0-1.x86_64\n")


def write(tmp: Path, blob: bytes, name: str = "a.tar") -> Path:
    path = tmp / name
    path.write_bytes(blob)
    return path


# --- the three tars -----------------------------------------------------------------------------

_LINE = {
    "gnu": re.compile(r"^(\S{10}) \S+\s+(\d+) \d{4}-\d\d-\d\d \d\d:\d\d (.*)$"),
    "busybox": re.compile(r"^(\S{10}) \S+\s+(\d+) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)$"),
    "bsdtar": re.compile(r"^(\S{10})\s+\d+ \S+\s+\S+\s+(\d+) \w{3} [ \d]\d\s+[\d:]+ (.*)$"),
}


def listing(tool: str, archive: Path) -> list[tuple[str, str, int, str, str]]:
    """(type, permissions, size, name, link target) per member, as the tool lists them."""
    proc = subprocess.run([*TARS[tool], "-tvf", str(archive)], capture_output=True, text=True,
                          env=ENV)
    assert proc.returncode == 0, (tool, proc.stderr)
    out = []
    for line in proc.stdout.splitlines():
        m = _LINE[tool].match(line)
        assert m is not None, (tool, line)
        mode, size, rest = m.group(1), int(m.group(2)), m.group(3)
        kind, target = mode[0], ""
        if kind == "l":
            rest, target = rest.split(" -> ", 1)
        elif kind == "h":
            rest, target = rest.split(" link to ", 1)
        elif tool == "busybox" and " -> " in rest:  # busybox shows a hard link so
            kind = "h"
            rest, target = rest.split(" -> ", 1)
        out.append((kind, mode[1:] if kind != "l" else "", size, rest, target))
    return out


def unpack(tool: str, archive: Path, jail: Path) -> Path:
    """Unpacked as root unpacks (owners and modes kept) into jail/deep/down/root."""
    root = jail / tool / "deep" / "down" / "root"
    root.mkdir(parents=True)
    argv = {"gnu": ["tar", "-xpf"], "bsdtar": ["bsdtar", "-xpf"],
            "busybox": ["busybox", "tar", "-xf"]}[tool]
    proc = subprocess.run([*argv, str(archive), "-C", str(root)], capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 0, (tool, proc.stderr)
    return root


def tree(root: Path) -> list[tuple[str, str, int, int, str]]:
    """(path, type, permissions, size, link target) of everything under root."""
    out = []
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        kind = "l" if stat.S_ISLNK(st_.st_mode) else "d" if stat.S_ISDIR(st_.st_mode) else "-"
        out.append((str(p.relative_to(root)), kind, stat.S_IMODE(st_.st_mode),
                    st_.st_size if kind == "-" else 0, os.readlink(p) if kind == "l" else ""))
    return out


def assert_same_everywhere(archive: Path, tmp: Path, special: int = 0o4000
                           ) -> list[tuple[str, str, int, str, str]]:
    """Lists and unpacks the same under the three tars; nothing leaves the root; no setuid
    bit (special: the bits nothing may have; a directory's setgid bit is harmless)."""
    lists = {tool: listing(tool, archive) for tool in TARS}
    assert lists["gnu"] == lists["bsdtar"] == lists["busybox"], lists
    jail = tmp / f"jail-{archive.name}"
    trees = {}
    for tool in TARS:
        root = unpack(tool, archive, jail)
        trees[tool] = tree(root)
        outside = [p for p in (jail / tool).rglob("*") if root not in (p, *p.parents)
                   and p not in root.parents]
        assert not outside, (tool, outside)
        for path, kind, mode, _, target in trees[tool]:
            assert not mode & special, (tool, path, oct(mode))
            assert kind == "d" or not mode & 0o6000, (tool, path, oct(mode))
            if target:
                resolved = (root / path).resolve()
                assert resolved == root.resolve() or root.resolve() in resolved.parents, \
                    (tool, path, target)
    # the three agree on the tree (busybox keeps no directory times, so they are not compared)
    assert trees["gnu"] == trees["bsdtar"] == trees["busybox"], trees
    shutil.rmtree(jail)
    return lists["gnu"]


def check_accepted(path: Path, tmp: Path) -> tarcheck.Contents:
    """Accepted: the original and its re-pack list and unpack alike under the three tars, and
    the re-pack holds exactly the checked members, owned by root, without setuid bits."""
    repack = tmp / f"{path.name}.repack.tar"
    contents = tarcheck.inspect(path, repack_to=repack)
    assert contents.problem is None, contents.problem
    if contents.compression == "none":
        assert_same_everywhere(path, tmp)
    else:
        # busybox does not detect compression: the three read the same decompressed stream
        plain = tmp / f"{path.name}.plain.tar"
        tool = {"gzip": "gzip", "xz": "xz", "bzip2": "bzip2"}[contents.compression]
        with plain.open("wb") as f:
            subprocess.run([tool, "-dc", str(path)], stdout=f, check=True)
        assert_same_everywhere(plain, tmp)
    listed = assert_same_everywhere(repack, tmp, special=0o7000)
    names = {name.rstrip("/") for _, _, _, name, _ in listed}
    assert names == {n for n in contents.kinds if n}
    owners = subprocess.run(["tar", "--numeric-owner", "-tvf", str(repack)], capture_output=True,
                            text=True, check=True).stdout
    assert all(line.split()[1] == "0/0" for line in owners.splitlines()), owners
    assert contents.repack_size == repack.stat().st_size
    return contents


def refused(path: Path) -> str:
    repack = path.with_suffix(".repack")
    contents = tarcheck.inspect(path, repack_to=repack)
    assert contents.problem is not None
    assert "\n" not in contents.problem
    assert not repack.exists()  # nothing of a refused archive is handed on
    return contents.problem


# --- hostile archives ---------------------------------------------------------------------------


def smuggled_by_pax_size() -> bytes:
    """Python, GNU tar and bsdtar read the PAX size and see one text file; busybox reads the
    header's size 0 and then the 'data', which is a setuid-root shell."""
    hidden = member("su", b"#!/bin/sh\nexec /bin/sh\n", mode=0o4755)
    return ADV + pax({"size": str(len(hidden))}) + header("notes.txt", size=0) + hidden + END


def test_pax_size_smuggles_a_setuid_file_past_other_readers(tmp_path: Path) -> None:
    _need_tars()
    path = write(tmp_path, smuggled_by_pax_size())
    assert "su" in [m[3] for m in listing("busybox", path)]  # what the old check never saw
    assert [m[3] for m in listing("gnu", path)] == ["advisories.txt", "notes.txt"]
    assert refused(path) == ("member 'notes.txt': PAX size 1024 but the header says 0 "
                             "(busybox reads the header)")


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "gnu-prefix-in-old-gnu-header": (
        lambda: ADV + header("su", magic=b"ustar  \x00", prefix=b"files") + END,
        "old GNU fields"),
    "star-extra-fields": (
        lambda: ADV + header("f", prefix=b"x", tail=b"tar\x00") + END, "star's extra fields"),
    "v7-header": (lambda: ADV + header("f", magic=bytes(8)) + END, "neither a POSIX ustar"),
    "signed-checksum": (lambda: ADV + header("caf\xe9".encode("latin-1"), signed=True) + END,
                        "bad checksum"),
    "base-256-size": (lambda: ADV + header("f", size_field=b"\x80" + bytes(10) + b"\x01") + END,
                      "base-256"),
    "size-not-octal": (lambda: ADV + header("f", size_field=b"00000000009\x00") + END,
                       "not an octal number"),
    "duplicate-name": (lambda: ADV + member("files/x", b"a") + member("./files/x", b"b") + END,
                       "comes twice"),
    "duplicate-after-slash": (lambda: ADV + header("d/", flag=b"5", mode=0o755)
                              + header("d", flag=b"5", mode=0o700) + END, "comes twice"),
    "regular-file-with-slash": (lambda: ADV + header("d/", flag=b"\x00") + END,
                                "name ending in '/'"),
    "empty-component": (lambda: ADV + member("a//b", b"x") + END, "empty or '.' component"),
    "dot-component": (lambda: ADV + member("a/./b", b"x") + END, "empty or '.' component"),
    "contiguous": (lambda: ADV + header("f", flag=b"7") + END, "contiguous"),
    "gnu-sparse-type": (lambda: ADV + header("f", flag=b"S", magic=b"ustar  \x00") + END,
                        "sparse"),
    "pax-xattr-capability": (
        lambda: ADV + pax({"SCHILY.xattr.security.capability": "x"}) + member("f", b"x") + END,
        "extended attributes"),
    "file-with-link-target": (lambda: ADV + header("f", linkname="advisories.txt") + END,
                              "busybox makes it a hard link"),
    "pax-sparse": (lambda: ADV + pax({"GNU.sparse.size": "10"}) + member("f", b"x") + END,
                   "sparse"),
    "pax-global-path": (lambda: ADV + pax({"path": "etc/passwd"}, flag=b"g") + member("f", b"x")
                        + END, "global PAX header"),
    "pax-duplicate-key": (lambda: ADV + header("PaxHeaders/x", size=20, flag=b"x")
                          + data(b"10 path=a\n10 path=b\n") + member("c", b"x") + END,
                          "the key 'path' twice"),
    "pax-then-gnu-long-name": (
        lambda: ADV + pax({"path": "a"}) + header("././@LongLink", size=2, flag=b"L")
        + data(b"b\x00") + member("c", b"x") + END, "GNU long name after a PAX header"),
    "two-gnu-long-names": (
        lambda: ADV + header("././@LongLink", size=2, flag=b"L") + data(b"a\x00")
        + header("././@LongLink", size=2, flag=b"L") + data(b"b\x00") + member("c") + END,
        "two GNU long names"),
    "directory-with-data": (lambda: ADV + header("d", flag=b"5", size=512) + data(
        header("su", mode=0o4755)) + END, "bytes of data"),
    "lone-zero-block": (lambda: ADV + bytes(BLOCK) + member("late", b"x") + END,
                        "lone zero block"),
    "garbage-after-end": (lambda: ADV + END + b"\x01" * BLOCK, "after the end-of-archive"),
    "hard-link-to-later": (lambda: ADV + header("h", flag=b"1", linkname="f") + member("f", b"x")
                           + END, "not an earlier member"),
    "hard-link-to-dir": (lambda: ADV + header("d", flag=b"5") + header("h", flag=b"1",
                                                                       linkname="d") + END,
                         "not an earlier member"),
    "setuid": (lambda: ADV + member("files/su", b"x", mode=0o4755) + END, "setuid"),
    # GNU tar keeps a directory's setuid bit (a setgid one only passes its group on)
    "setuid-directory": (lambda: ADV + header("d", flag=b"5", mode=0o4755) + END, "setuid"),
    "device": (lambda: ADV + header("dev/sda", flag=b"4") + END, "is a device"),
    # links, component by component, through links made before and after
    "file-through-earlier-symlink": (
        lambda: ADV + header("d", flag=b"2", linkname="files") + member("d/x", b"x") + END,
        "lies beneath the link 'd'"),
    "file-before-symlink-made-later": (
        lambda: ADV + member("d/x", b"x") + header("d", flag=b"2", linkname="files") + END,
        "lies beneath the link 'd'"),
    "file-beneath-file": (lambda: ADV + member("f", b"x") + member("f/x", b"y") + END,
                          "lies beneath the file 'f'"),
    "dot-then-dotdot": (  # lexically '.', physically the root's parent
        lambda: ADV + header("x", flag=b"2", linkname=".") + header("y", flag=b"2",
                                                                    linkname="x/..") + END,
        "symlink 'y' points outside the archive ('x/..')"),
    "loop": (lambda: ADV + header("a", flag=b"2", linkname="b") + header("b", flag=b"2",
                                                                         linkname="a") + END,
             "more than 40 links"),
    "absolute-symlink": (lambda: ADV + header("s", flag=b"2", linkname="/etc") + END,
                         "absolute path"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_refused(tmp_path: Path, case: str) -> None:
    make, expected = HOSTILE[case]
    problem = refused(write(tmp_path, make()))
    assert expected in problem, problem


def test_link_resolution_follows_later_links(tmp_path: Path) -> None:
    """up -> a/b/../.. is the root read lexically; but a/b, made later, is a link to x, so up
    is x/../.. = the root's parent."""
    blob = (ADV + header("up", flag=b"2", linkname="a/b/../..") + header("a", flag=b"5")
            + header("c/d/e", flag=b"5") + header("a/b", flag=b"2", linkname="../x") + END)
    assert "symlink 'up' points outside the archive" in refused(write(tmp_path, blob))
    inside = (ADV + header("up", flag=b"2", linkname="a/b/..") + header("a", flag=b"5")
              + header("c/d", flag=b"5") + header("a/b", flag=b"2", linkname="../c/d") + END)
    _need_tars()
    check_accepted(write(tmp_path, inside, "inside.tar"), tmp_path)


def test_gnu_tar_sparse_member_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "advisories.txt").write_text("X-1:1 Important/Sec. p-1.0-1.x86_64\n")
    with (src / "sparse").open("wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"data")
    for fmt, expected in (("gnu", "GNU sparse file"), ("posix", "sparse")):
        out = tmp_path / f"sparse-{fmt}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", str(out),
                        "advisories.txt", "sparse"], check=True)
        assert expected in refused(out)


# --- accepted archives: the same under every tar ------------------------------------------------


def tree_for_tars(src: Path) -> None:
    (src / "files" / "sub").mkdir(parents=True)
    (src / "advisories.txt").write_text("X-1:1 Important/Sec. p-1.0-1.x86_64\n")
    (src / "files" / "a").write_text("a\n")
    (src / "files" / "exec").write_text("#!/bin/sh\n")
    (src / "files" / "exec").chmod(0o755)
    long_dir = src / "files" / ("long-" + "d" * 90) / ("deeper-" + "e" * 80)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 120)).write_text("long\n")
    (src / "files" / "café").write_text("unicode\n")
    os.symlink("../a", src / "files" / "sub" / "rel")
    os.symlink("sub", src / "files" / "dirlink")
    os.symlink(os.path.relpath(long_dir / ("f" * 120), src / "files"), src / "files" / "longl")
    os.link(src / "files" / "a", src / "files" / "hard")


@pytest.mark.parametrize("maker", ["gnu", "posix", "ustar-short", "bsdtar", "bsdtar-pax",
                                   "python-pax", "python-gnu", "gnu-dot-gz"])
def test_accepted_archives_list_and_unpack_alike(tmp_path: Path, maker: str) -> None:
    _need_tars()
    src = tmp_path / "src"
    src.mkdir()
    tree_for_tars(src)
    out = tmp_path / "made.tar"
    if maker in ("gnu", "posix"):
        subprocess.run(["tar", f"--format={maker}", "-C", str(src), "-cf", str(out),
                        "advisories.txt", "files"], check=True)
    elif maker == "ustar-short":
        shutil.rmtree(src / "files" / ("long-" + "d" * 90))
        (src / "files" / "longl").unlink()
        subprocess.run(["tar", "--format=ustar", "-C", str(src), "-cf", str(out),
                        "advisories.txt", "files"], check=True)
    elif maker.startswith("bsdtar"):
        pax_opt = ["--format=pax"] if maker == "bsdtar-pax" else []
        subprocess.run(["bsdtar", *pax_opt, "--no-xattrs", "-C", str(src), "-cf", str(out),
                        "advisories.txt", "files"], check=True)
    elif maker.startswith("python"):
        fmt = tarfile.PAX_FORMAT if maker == "python-pax" else tarfile.GNU_FORMAT
        with tarfile.open(out, "w", format=fmt) as tar:
            tar.add(src / "advisories.txt", "advisories.txt")
            tar.add(src / "files", "files")
    else:
        out = tmp_path / "made.tar.gz"
        subprocess.run(["tar", "-C", str(src), "--owner=0", "--group=0", "-czf", str(out), "."],
                       check=True)
    contents = check_accepted(out, tmp_path)
    assert "files/hard" in contents.names and contents.kinds["files/dirlink"] == "symlink"


# --- generated archives ---------------------------------------------------------------------------

NAMES = st.lists(st.sampled_from(["a", "b", "..", ".", "", "c"]), min_size=1, max_size=3).map(
    "/".join)
MEMBERS = st.lists(st.tuples(
    NAMES, st.sampled_from(["file", "dir", "symlink", "hardlink"]), NAMES,
    st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0o2755, 0o600])), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=MEMBERS, fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT,
                                             tarfile.USTAR_FORMAT]))
def test_generated_archives(tmp_path: Path, members: list[tuple[str, str, str, int]],
                            fmt: int) -> None:
    """Whatever the check accepts, the three tars list and unpack alike, inside the root."""
    _need_tars()
    work = tmp_path / f"gen-{os.urandom(4).hex()}"
    work.mkdir()
    path = work / "gen.tar"
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE}
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, target, mode in members:
            info = tarfile.TarInfo(name or ".")
            info.type = types[kind]
            info.mode = mode
            info.linkname = target if kind in ("symlink", "hardlink") else ""
            body = f"{name}\n".encode() if kind == "file" else b""
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    contents = tarcheck.inspect(path, repack_to=work / "r.tar")
    if contents.problem is None:
        check_accepted(path, work)
    else:
        assert "\n" not in contents.problem
    shutil.rmtree(work)


# --- generated headers, byte by byte ------------------------------------------------------------

PIECE_NAMES = st.sampled_from(["a", "b", "a/b", "./a", "a/", "d/e/f", "..", "c" * 120, "é"])
PAX_KEYS = st.sampled_from(["path", "linkpath", "size", "uid", "mtime", "comment", "hdrcharset",
                            "SCHILY.xattr.user.x", "GNU.sparse.size", "atime"])


@st.composite
def raw_member(draw: st.DrawFn) -> bytes:
    """One member as hostile writers make it: optional PAX or GNU long-name headers, then a
    header with any type, magic, prefix and size field, then its data."""
    out = b""
    name = draw(PIECE_NAMES)
    body = draw(st.sampled_from([b"", b"x", header("su", mode=0o4755)]))
    ext = draw(st.sampled_from(["none", "pax", "pax-global", "L", "K", "LK"]))
    if ext.startswith("pax"):
        records = {k: draw(st.sampled_from([name, "0", str(len(body)), "1024", "b"]))
                   for k in draw(st.lists(PAX_KEYS, max_size=3, unique=True))}
        out += pax(records, flag=b"g" if ext == "pax-global" else b"x")
    for long_flag in ext if ext in ("L", "K", "LK") else "":
        long = draw(PIECE_NAMES).encode() + b"\x00"
        out += header("././@LongLink", size=len(long), flag=long_flag.encode()) + data(long)
    flag = draw(st.sampled_from([b"0", b"\x00", b"1", b"2", b"5", b"7", b"S", b"x"]))
    magic = draw(st.sampled_from([b"ustar\x0000", b"ustar  \x00", bytes(8)]))
    prefix = draw(st.sampled_from([b"", b"p"]))
    size = len(body) if flag in (b"0", b"\x00", b"7") else draw(st.sampled_from([0, len(body)]))
    size_field = draw(st.sampled_from([None, None, b"%011o " % size, b" %010o\x00" % size]))
    out += header(name, size=size, mode=draw(st.sampled_from([0o644, 0o755, 0o4755])),
                  flag=flag, linkname=draw(PIECE_NAMES) if flag in (b"1", b"2") else b"",
                  magic=magic, prefix=prefix, size_field=size_field)
    return out + data(body)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(raw_member(), min_size=1, max_size=4),
       end=st.sampled_from([END, END + bytes(BLOCK * 18), bytes(BLOCK) + END[:BLOCK] + ADV]))
def test_generated_headers(tmp_path: Path, members: list[bytes], end: bytes) -> None:
    """Whatever the check accepts of hand-made headers, the three tars list alike."""
    _need_tars()
    work = tmp_path / f"raw-{os.urandom(4).hex()}"
    work.mkdir()
    path = write(work, ADV + b"".join(members) + end)
    contents = tarcheck.inspect(path, repack_to=work / "r.tar")
    if contents.problem is None:
        check_accepted(path, work)
    else:
        assert "\n" not in contents.problem
    shutil.rmtree(work)
