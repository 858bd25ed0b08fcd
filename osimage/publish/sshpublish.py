"""Publishing to the SSH mirror: upload over SFTP, rename into place, check each file over HTTP.

SSHMirror (osimage/publish/sshmirror.py) connects and authenticates; this module is what a publish
does with the SFTP session. How it keeps the mirror consistent:
- one publisher per folder: the lock `.VERSION.publish-lock` beside builds/IMAGE/VERSION on the
  mirror (osimage/publish/mirrorlock.py); a second host publishing the same version fails at once.
- a published file never changes: a file in place with other bytes (size, or sha256 over HTTP)
  refuses the publish before anything is sent, unless replace (--replace).
- every file goes to `.NAME.partial-SHA16` beside its final name (SHA16: the first 16 hex
  digits of the sha256 recorded at build time); it is renamed into place (posix-rename, atomic)
  only after the sha256 of the bytes sent, computed while sending, equals the recorded one and
  the size on the mirror is right. Nothing incomplete is ever visible under a final name.
- the renamed files are then read back over HTTP; if that check fails or the publish is
  interrupted, they are renamed back to their partial names: the mirror holds no final file
  that the build did not verify (and the next publish of the same bytes resumes them).
- a stop request (Ctrl-C, SIGTERM, SIGHUP) is seen after each MiB sent, and nothing is
  renamed into place after one.
- the dot-prefixed partial stays when the connection drops or the publish is interrupted; the
  next publish of the same bytes resumes it (the local prefix is hashed while skipping it, so
  the file is still read once). Its name carries the expected sha256, so a partial of other
  bytes (a rebuilt image) is never resumed: it is deleted.
- on "disk full" the partials of this publish are deleted to give the space back.
- renames happen after every upload succeeded, artifacts before their NAME.sha256 files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import posixpath
import stat
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import paramiko
import requests
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_WRITE, int64

from osimage import netreason
from osimage.errors import BuildError
from osimage.netreason import os_reason
from osimage.publish.artifacts import Artifact, ThreadedHasher, parse_checksum_file
from osimage.publish.mirrorlock import PublishLock, lock_path, refuse_replacing
from osimage.publish.sshpipe import PipeUnavailable, SSHPipe
from osimage.runner import check_interrupted, say
from osimage.sizes import human

REQUEST_SIZE = 255 * 1024  # OpenSSH's sftp-server takes messages up to 256 KiB
BLOCK = 4 * REQUEST_SIZE  # local reads: whole requests, big enough that hashlib drops the GIL
WRITES_IN_FLIGHT = 32  # unanswered writes; the server's SSH window (2 MiB) limits them anyway
HTTP_CONNECT_TIMEOUT = 15.0
HTTP_TIMEOUT = 60.0
DISK_FULL_SLACK = 4 * REQUEST_SIZE
# below this a file goes over the SFTP session: an ssh connection costs more than it saves
PIPE_MIN_SIZE = 32 << 20
RESUME_HINT = ("the partial upload stays on the mirror: publishing the same files again "
               "sends only the rest")

Progress = Callable[[str, int, int], None]
Connect = Callable[[], AbstractContextManager[paramiko.SFTPClient]]


@dataclass
class TransferStats:
    """What the last publish did; bytes_sent counts file bytes, not protocol overhead."""

    bytes_sent: int = 0
    bytes_resumed: int = 0
    files_sent: int = 0
    files_already_there: int = 0
    cipher: str = ""
    channel: str = "sftp"  # how the last large file went: "ssh" (OpenSSH client) or "sftp"
    upload_seconds: float = 0.0
    verify_seconds: float = 0.0


@dataclass
class _Item:
    """One file to publish: an artifact or its NAME.sha256."""

    name: str
    size: int
    sha256: str
    path: Path | None = None
    data: bytes | None = None
    offset: int = 0
    skip: bool = False
    partial_exists: bool = False

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb", buffering=0)

    @property
    def partial(self) -> str:
        return f".{self.name}.partial-{self.sha256[:16]}"


def verify_http(url: str, size: int, sha256: str, *, timeout: float = HTTP_TIMEOUT,
                tick: Callable[[], None] | None = None) -> None:
    """GET url streamed, hashing as it arrives; BuildError unless size and sha256 match.
    tick runs after each chunk (a stop request is seen there)."""
    h = hashlib.sha256()
    got = 0
    headers = {"Accept-Encoding": "identity", "Cache-Control": "no-cache"}
    try:
        with requests.get(url, stream=True, timeout=(HTTP_CONNECT_TIMEOUT, timeout),
                          headers=headers) as r:
            if r.status_code != 200:
                raise BuildError(f"mirror HTTP check: {url}: "
                                 f"{netreason.http_status(r.status_code, r.reason)}",
                                 hint="mirror.http must serve the mirror's root folder")
            for chunk in r.iter_content(BLOCK):
                h.update(chunk)
                got += len(chunk)
                if tick is not None:
                    tick()
    except (requests.RequestException, OSError) as e:
        raise BuildError(f"mirror HTTP check: {url}: {netreason.reason(e)}",
                         hint="check mirror.http and that the mirror's web server runs") from None
    if got != size:
        raise BuildError(f"mirror HTTP check: {url}: served {got} bytes, expected {size}")
    if h.hexdigest() != sha256:
        raise BuildError(f"mirror HTTP check: {url}: sha256 {h.hexdigest()} does not match "
                         f"{sha256}", hint="the web server may serve another folder or a "
                         "stale cache; the SSH upload itself was verified")


class SFTPLockFiles:
    """mirrorlock.LockFiles over an SFTP session: the lock lives on the mirror itself."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            f = self.sftp.open(path, "wx")  # SSH_FXF_EXCL: of two creators, one wins
        except OSError:
            try:
                self.sftp.stat(path)
            except FileNotFoundError:
                raise  # not there, and still not creatable: the folder's permissions
            return False
        with f:
            f.write(data)
            f.chmod(0o644)
        return True

    def read_lock(self, path: str) -> tuple[bytes, float] | None:
        try:
            mtime = self.sftp.stat(path).st_mtime or 0
            with self.sftp.open(path, "r") as f:
                return f.read(), time.time() - mtime
        except FileNotFoundError:
            return None

    def touch(self, path: str) -> None:
        self.sftp.utime(path, None)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sftp.remove(path)


@dataclass
class Publish:
    """One publish of files to ROOT/dest on the mirror `where` (user@host:port)."""

    where: str
    host: str
    root: str
    http_base: str
    io_timeout: float
    progress: Progress | None = None
    check_free_space: bool = True
    pipe: Callable[[], SSHPipe | None] = lambda: None  # the OpenSSH client, if there is one
    pipe_min_size: int = PIPE_MIN_SIZE
    stats: TransferStats = field(default_factory=TransferStats)
    _phase: str = "connecting"
    _renamed: list[_Item] = field(default_factory=list)
    _lock: PublishLock | None = None
    _large_left: int = 0  # files still to go through the pipe

    def run(self, connect: Connect, artifacts: Sequence[Artifact], dest: str,
            replace: bool = False) -> list[str]:
        dest = _clean_dest(dest)
        items: list[_Item] = []
        for a in artifacts:
            items.append(_Item(a.name, a.size, a.sha256, path=a.path))
            data = _checksum_text(a).encode()
            items.append(_Item(a.checksum_path.name, len(data),
                               hashlib.sha256(data).hexdigest(), data=data))
        remote_dir = posixpath.join(self.root, dest)
        with connect() as sftp:
            pipe = self.pipe()
            if pipe is not None and any(item.size >= self.pipe_min_size for item in items):
                pipe.prestart()  # its handshake overlaps the folder, lock and listing work
            lock = PublishLock(SFTPLockFiles(sftp), remote_dir,
                               f"{self.host}:{lock_path(remote_dir)}")
            try:
                self._phase = f"creating {remote_dir}"
                self._makedirs(sftp, dest)
                self._phase = f"locking {remote_dir}"
                lock.acquire()
                self._lock = lock
                self._plan(sftp, items, remote_dir, dest, replace)
                start = time.monotonic()
                self._large_left = sum(1 for item in items
                                       if not item.skip and item.size >= self.pipe_min_size)
                for item in items:
                    if not item.skip:
                        self._upload(sftp, item, remote_dir)
                self.stats.upload_seconds = time.monotonic() - start
                check_interrupted()  # nothing is renamed into place after a stop request
                # artifacts before their checksum files: a NAME.sha256 implies its NAME
                for item in items[0::2] + items[1::2]:
                    if not item.skip:
                        self._phase = f"renaming {item.partial} to {item.name}"
                        sftp.posix_rename(posixpath.join(remote_dir, item.partial),
                                          posixpath.join(remote_dir, item.name))
                        self._renamed.append(item)
                start = time.monotonic()
                for item in items:
                    if not item.skip:
                        self._phase = f"checking {item.name} over HTTP"
                        verify_http(self._http_url(dest, item.name), item.size, item.sha256,
                                    tick=self._tick)
                self.stats.verify_seconds = time.monotonic() - start
            except (OSError, EOFError, paramiko.SSHException) as e:
                self._take_back(sftp, remote_dir)
                raise self._failure(sftp, e, items, remote_dir) from None
            except BaseException:
                self._take_back(sftp, remote_dir)
                raise
            finally:
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    lock.release()
        return [f"{dest}/{item.name}" for item in items]

    def _tick(self) -> None:
        check_interrupted()
        if self._lock is not None:
            self._lock.heartbeat()

    def _take_back(self, sftp: paramiko.SFTPClient, remote_dir: str) -> None:
        """Rename what this publish put in place back to partial names: a file the HTTP
        check did not pass (or did not finish) is not published. Checksum files first."""
        for item in list(reversed(self._renamed)):
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                sftp.posix_rename(posixpath.join(remote_dir, item.name),
                                  posixpath.join(remote_dir, item.partial))
                self._renamed.remove(item)

    def _http_url(self, dest: str, name: str) -> str:
        return f"{self.http_base}/{urllib.parse.quote(f'{dest}/{name}')}"

    def _plan(self, sftp: paramiko.SFTPClient, items: list[_Item], remote_dir: str,
              dest: str, replace: bool) -> None:
        """Decide per file: already in place, resume a partial, or send it all; refuse to
        give a published file other bytes unless replace."""
        self._phase = f"listing {remote_dir}"
        present = {a.filename: a for a in sftp.listdir_attr(remote_dir)}
        ours = {item.partial for item in items}
        changed: list[str] = []
        for item in items:
            stale = [n for n in present if n.startswith(f".{item.name}.partial-")
                     and n not in ours]
            for name in stale:  # a partial of other bytes: never resumable
                self._phase = f"removing the stale {name}"
                sftp.remove(posixpath.join(remote_dir, name))
                del present[name]
            final = present.get(item.name)
            if final is not None:
                if self._in_place(sftp, item, final, remote_dir, dest):
                    item.skip = True
                    self.stats.files_already_there += 1
                    continue
                changed.append(item.name)
            partial = present.get(item.partial)
            have = partial.st_size or 0 if partial is not None else 0
            item.partial_exists = partial is not None
            if item.data is None and 0 < have <= item.size:
                # resend the last MiB: a torn tail of the previous attempt is overwritten
                item.offset = max(0, (have // BLOCK) * BLOCK - BLOCK)
        if changed and not replace:
            raise refuse_replacing(f"mirror {self.where}: {dest}", changed)
        if self.check_free_space:
            needed = sum(item.size - item.offset for item in items if not item.skip)
            free = self._free_bytes(sftp, remote_dir)
            if free is not None and needed + DISK_FULL_SLACK > free:
                raise BuildError(f"mirror disk full: {dest} needs {human(needed)}, "
                                 f"{self.host}:{remote_dir} has {human(free)} free",
                                 hint="free space on the mirror, then run again")

    def _in_place(self, sftp: paramiko.SFTPClient, item: _Item, final: paramiko.SFTPAttributes,
                  remote_dir: str, dest: str) -> bool:
        """Whether the file in place has item's bytes: a checksum file is read back over
        SFTP, an artifact over HTTP (as a user downloads it) rather than sent again."""
        if final.st_size != item.size:
            return False
        if item.data is not None:
            self._phase = f"reading {item.name}"
            with sftp.open(posixpath.join(remote_dir, item.name), "r") as f:
                return bool(f.read() == item.data)
        try:
            verify_http(self._http_url(dest, item.name), item.size, item.sha256,
                        tick=self._tick)
        except BuildError:
            return False  # not the right bytes (or not served)
        return True

    def _upload(self, sftp: paramiko.SFTPClient, item: _Item, remote_dir: str) -> None:
        """Send item to its partial name, hashing the bytes as they are read: a large file
        through the OpenSSH client when there is one, else (and small files) over SFTP."""
        target = posixpath.join(remote_dir, item.partial)
        self._phase = f"uploading {item.name}"
        hasher = ThreadedHasher()
        done = 0
        try:
            with item.open() as src:
                while done < item.offset:  # the prefix already on the mirror: hash only
                    block = src.read(min(BLOCK, item.offset - done))
                    if not block:
                        break
                    hasher.update(block)
                    done += len(block)
                    check_interrupted()
                resume = bool(item.offset) and done == item.offset
                self.stats.bytes_resumed += done

                def sent(block: bytes) -> None:
                    nonlocal done
                    hasher.update(block)
                    done += len(block)
                    self.stats.bytes_sent += len(block)
                    self._tick()
                    if self.progress is not None:
                        self.progress(item.name, done, item.size)

                item.partial_exists = True
                pipe = self.pipe() if item.size >= self.pipe_min_size else None
                if pipe is not None:
                    try:
                        self._send_pipe(sftp, pipe, target, resume, src, sent)
                    except PipeUnavailable as e:  # raised before any byte was taken
                        self.pipe = lambda: None  # for the rest of this publish
                        say(f"mirror {self.where}: ssh cannot run commands there ({e}); "
                            "sending over SFTP")
                        pipe = None
                if pipe is None:
                    if item.size >= self.pipe_min_size:
                        self.stats.channel = "sftp"
                    self._send_sftp(sftp, target, resume, src, sent)
        finally:
            digest = hasher.hexdigest()
        if digest != item.sha256 or done != item.size:
            with contextlib.suppress(OSError):
                sftp.remove(target)
            raise BuildError(f"{item.name} changed since its checksum was recorded "
                             f"(sha256 now {digest}, recorded {item.sha256}); nothing was "
                             "published", hint="rebuild the image")
        size = sftp.stat(target).st_size
        if size != item.size:
            raise BuildError(f"mirror: {item.name} is {size} bytes on the mirror after "
                             f"upload, expected {item.size}; nothing was published")
        self.stats.files_sent += 1

    def _send_pipe(self, sftp: paramiko.SFTPClient, pipe: SSHPipe, target: str, resume: bool,
                   src: IO[bytes], sent: Callable[[bytes], None]) -> None:
        """The bytes through `ssh ... cat`; SFTP makes the file private to us, sized for a
        resume, readable by the web server and durable."""
        if resume:
            sftp.truncate(target, src.tell())  # the torn tail goes; cat appends from here
        else:
            sftp.open(target, "w").close()
        sftp.chmod(target, 0o644)
        self.stats.channel = "ssh"
        pipe.send(target, iter(lambda: src.read(BLOCK), b""), sent)
        self._large_left -= 1
        if self._large_left > 0:
            pipe.prestart()  # for the next large file, while this one is made durable
        self.stats.cipher = pipe.cipher or self.stats.cipher
        with sftp.open(target, "r+") as dst:
            _Wire(sftp).fsync(dst.handle)

    @staticmethod
    def _send_sftp(sftp: paramiko.SFTPClient, target: str, resume: bool, src: IO[bytes],
                   sent: Callable[[bytes], None]) -> None:
        wire = _Wire(sftp)
        done = src.tell()
        with sftp.open(target, "r+" if resume else "w", bufsize=0) as dst:
            dst.chmod(0o644)
            while block := src.read(BLOCK):
                wire.write(dst.handle, done, block)
                done += len(block)
                sent(block)
            wire.finish_writes()
            wire.fsync(dst.handle)

    def _failure(self, sftp: paramiko.SFTPClient, e: BaseException, items: Sequence[_Item],
                 remote_dir: str) -> BuildError:
        """One clear error for a failed transfer; on disk full, give the space back."""
        channel = sftp.get_channel()
        alive = channel is not None and not channel.closed and \
            channel.get_transport().is_active()
        if not alive or isinstance(e, (EOFError, paramiko.SSHException, ConnectionError)):
            return BuildError(f"mirror {self.where}: connection lost while {self._phase}; "
                              f"{self._outcome()}", hint=RESUME_HINT)
        if isinstance(e, TimeoutError):
            return BuildError(f"mirror {self.where}: no answer for {self.io_timeout:.0f} s "
                              f"while {self._phase}; {self._outcome()}", hint=RESUME_HINT)
        code = e.errno if isinstance(e, OSError) else None
        disk_full = code in (errno.ENOSPC, errno.EDQUOT) or (
            code is None and self._disk_full(sftp, remote_dir))
        # OpenSSH's sftp-server answers a failed write with a bare "Failure"
        write_refused = code is None and self._phase.startswith("uploading")
        if disk_full or write_refused:
            for item in items:
                if item.partial_exists and not item.skip:
                    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                        sftp.remove(posixpath.join(remote_dir, item.partial))
        if disk_full:
            return BuildError(f"mirror disk full while {self._phase} to {self.host}:"
                              f"{remote_dir}; {self._outcome()}",
                              hint="free space on the mirror, then run again")
        if write_refused:
            return BuildError(f"mirror {self.where}: the mirror refused a write while "
                              f"{self._phase} ({os_reason(e)}: over quota, or a disk error); "
                              f"{self._outcome()}",
                              hint="check the quota and the disk of the mirror, then run again")
        return BuildError(f"mirror {self.where}: {self._phase} failed: {os_reason(e)}; "
                          f"{self._outcome()}")

    def _outcome(self) -> str:
        if self._renamed:  # could not be taken back: the connection is gone
            return f"{len(self._renamed)} file(s) stayed in place unverified"
        return "nothing was published"

    def _disk_full(self, sftp: paramiko.SFTPClient, remote_dir: str) -> bool:
        free = self._free_bytes(sftp, remote_dir)
        return free is not None and free < DISK_FULL_SLACK

    @staticmethod
    def _free_bytes(sftp: paramiko.SFTPClient, path: str) -> int | None:
        """Free bytes where path lives (OpenSSH's statvfs extension), None if unknown."""
        try:
            fields = _Wire(sftp).statvfs(path)
        except (OSError, EOFError, paramiko.SSHException):
            return None
        if fields is None:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = fields
        return frsize * bavail

    def _makedirs(self, sftp: paramiko.SFTPClient, dest: str) -> None:
        """Create ROOT/dest folder by folder; ROOT itself must exist (a typo in mirror.url
        must not grow a new tree on the mirror)."""
        try:
            root_mode = sftp.stat(self.root).st_mode or 0
        except FileNotFoundError:
            root_mode = 0
        if not stat.S_ISDIR(root_mode):
            raise BuildError(f"mirror {self.where}: the mirror root {self.root} is not a "
                             "folder there", hint="check mirror.url in the site file")
        current = self.root
        for part in dest.split("/"):
            current = posixpath.join(current, part)
            try:
                mode = sftp.stat(current).st_mode or 0
            except FileNotFoundError:
                try:
                    sftp.mkdir(current, 0o755)
                    continue
                except OSError as e:
                    try:  # made meanwhile by another publish, or a real error
                        mode = sftp.stat(current).st_mode or 0
                    except FileNotFoundError:
                        raise BuildError(
                            f"mirror {self.where}: cannot create {current}: {os_reason(e)}",
                            hint=f"the SSH user needs write access to "
                                 f"{posixpath.dirname(current)} on the mirror") from None
            if not stat.S_ISDIR(mode):
                raise BuildError(f"mirror {self.where}: {current} is not a folder")


def published(sftp: paramiko.SFTPClient, root: str, dest: str) -> list[str]:
    """The final names under ROOT/dest (partials and locks left out)."""
    try:
        names = sftp.listdir(posixpath.join(root, _clean_dest(dest)))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith("."))


class _Wire:
    """The private SFTPClient calls this module needs, in one place.

    paramiko has no API for OpenSSH's extensions (statvfs, fsync), and its pipelined
    SFTPFile.write drops the servers' answers to writes unread by their owner: a full disk
    went unnoticed. Here every write's answer is awaited, in order, with a bounded number of
    writes in flight, and a failed one raises.
    """

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._send = cast(Callable[..., int],
                          getattr(sftp, "_async_request"))  # noqa: B009 (not in the stubs)
        self._read = cast(Callable[[int], tuple[int | None, paramiko.Message | None]],
                          getattr(sftp, "_read_response"))  # noqa: B009 (not in the stubs)
        self._pending: deque[int] = deque()

    def request(self, kind: int, *args: Any) -> tuple[int | None, paramiko.Message | None]:
        """Send a request and wait for its answer; an error status raises OSError."""
        return self._read(self._send(type(None), kind, *args))

    def write(self, handle: object, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), REQUEST_SIZE):
            self._pending.append(self._send(type(None), CMD_WRITE, handle,
                                            int64(offset + start),
                                            view[start:start + REQUEST_SIZE]))
            while len(self._pending) > WRITES_IN_FLIGHT:
                self._read(self._pending.popleft())

    def finish_writes(self) -> None:
        while self._pending:
            self._read(self._pending.popleft())

    def fsync(self, handle: object) -> None:
        """Make a file durable before it is renamed (fsync@openssh.com, if offered)."""
        try:
            self.request(CMD_EXTENDED, "fsync@openssh.com", handle)
        except OSError as e:
            if "unsupported" not in str(e).lower():
                raise

    def statvfs(self, path: str) -> tuple[int, ...] | None:
        """OpenSSH's statvfs: (bsize, frsize, blocks, bfree, bavail, ...), None if unknown."""
        kind, msg = self.request(CMD_EXTENDED, "statvfs@openssh.com", path)
        if kind != CMD_EXTENDED_REPLY or msg is None:
            return None
        return tuple(msg.get_int64() for _ in range(5))


def _checksum_text(a: Artifact) -> str:
    """The NAME.sha256 content, as written at build time (regenerated if it is missing)."""
    with contextlib.suppress(OSError):
        text = a.checksum_path.read_text()
        if parse_checksum_file(text, a.name) == a.sha256:
            return text
    return f"{a.sha256}  {a.name}\n"


def _clean_dest(dest: str) -> str:
    clean = posixpath.normpath(dest.strip("/"))
    if not dest or clean.startswith("..") or clean == "." or posixpath.isabs(clean):
        raise BuildError(f"mirror: bad destination {dest!r}")
    return clean
