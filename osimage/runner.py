"""The one way this project runs external commands.

argv lists only (never a shell string), each command in its own process group, output
streamed line by line to a callback and a log, Ctrl-C and SIGTERM forwarded to the whole
group with escalation, and nothing of the group left running afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from osimage.errors import BuildError, Interrupted

# After the first signal the command gets this long to clean up (packer stops qemu and deletes
# its output), then SIGTERM, then SIGKILL: the whole stop stays well within 30 s.
GRACE_SECONDS = 18.0
TERM_SECONDS = 5.0
# What Packer prints when it waits on its terminal (-debug, -on-error=ask)
ASK_ENTER = b"Press enter to continue"
ASK_CLEANUP = b"[c] Clean up and exit"


# Secrets osimage reads from its own environment. No child inherits them: the code that needs
# one hands it over in a form of its own (skopeo gets a 0600 --authfile), or passes it in env=.
SECRET_ENV = frozenset({"OSIMAGE_REGISTRY_USERNAME", "OSIMAGE_REGISTRY_PASSWORD"})
_SECRET_SUFFIXES = ("_PASSWORD", "_TOKEN", "_SECRET")


def is_secret(name: str) -> bool:
    return name in SECRET_ENV or (name.startswith("OSIMAGE_") and name.endswith(_SECRET_SUFFIXES))


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this process's without its secrets, plus extra."""
    env = {k: v for k, v in os.environ.items() if not is_secret(k)}
    if extra:
        env.update(extra)
    return env


@dataclass
class Result:
    argv: list[str]
    returncode: int
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class _StopRequest:
    """Set by a signal handler: which signal arrived, when, and how many times."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.count = 0
        self.depth = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.first_at = time.monotonic()
        self.count += 1


_stop = _StopRequest()


# SIGHUP: the terminal was lost (a closed SSH session, a killed terminal window); without a
# handler it would end the build at once, leaving the VM, the key folder and the output.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def forwarded_signals() -> Iterator[_StopRequest]:
    """While active, SIGINT/SIGTERM/SIGHUP only record a stop request; the runner acts on it."""
    if threading.current_thread() is not threading.main_thread():
        yield _stop
        return
    if _stop.depth == 0:
        _stop.signum, _stop.count = None, 0
    old = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    _stop.depth += 1
    try:
        yield _stop
    finally:
        _stop.depth -= 1
        for s, h in old.items():
            signal.signal(s, h)


def interruption() -> Interrupted | None:
    """The error for the stop request, if one arrived (also after forwarded_signals ended)."""
    if _stop.signum is None:
        return None
    name = signal.Signals(_stop.signum).name
    return Interrupted(f"interrupted by {name}; the build was stopped and cleaned up")


def check_interrupted() -> None:
    """Raise Interrupted if a stop was requested between commands."""
    if (stop := interruption()) is not None:
        raise stop


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_group(pgid: int, timeout: float = 5.0) -> None:
    """Make sure no process of the group outlives the command (qemu children of packer)."""
    if not group_alive(pgid):
        return
    kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    log: IO[str] | None = None,
    stdin_data: str | None = None,
    stdin_file: Path | None = None,
    check: bool = True,
    what: str | None = None,
    tail_lines: int = 30,
) -> Result:
    """Run argv in its own process group, streaming each output line to on_line and log.

    A SIGINT/SIGTERM that arrives meanwhile is forwarded to the group as SIGINT, escalated to
    SIGTERM and SIGKILL if the command does not stop, and then raised as Interrupted.
    With check, a non-zero exit raises BuildError carrying the last lines of output.
    """
    args = [os.fspath(a) for a in argv]
    full_env = child_env(env)
    tail: deque[str] = deque(maxlen=tail_lines)
    with forwarded_signals() as stop, contextlib.ExitStack() as files:
        check_interrupted()
        stdin: IO[bytes] | int = subprocess.DEVNULL
        if stdin_data is not None:
            stdin = subprocess.PIPE
        elif stdin_file is not None:  # e.g. tar2sqfs reads its tar on stdin
            stdin = files.enter_context(stdin_file.open("rb"))
        try:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=full_env,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except FileNotFoundError:
            raise BuildError(f"{args[0]}: command not found",
                             hint=f"install {args[0]} or fix its path in the site file") from None
        pgid = proc.pid

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if on_line is not None:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        if stdin_data is not None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin_data)
                proc.stdin.close()
        # A waiter thread blocks in waitpid, so the end of the command is seen at once; the main
        # thread wakes on that or every 0.2 s to act on a stop request.
        exited = threading.Event()

        def wait_exit() -> None:
            proc.wait()
            exited.set()

        waiter = threading.Thread(target=wait_exit, daemon=True)
        waiter.start()
        forwarded = 0
        escalated = 0
        try:
            while not exited.wait(0.2):
                if stop.signum is None:
                    continue
                if forwarded == 0:
                    kill_group(pgid, signal.SIGINT)
                    forwarded = 1
                escalated = _escalate(pgid, stop.first_at, stop.count, escalated)
        finally:
            if proc.poll() is None:
                kill_group(pgid, signal.SIGKILL)
                proc.wait()
            reap_group(pgid)
            reader.join(timeout=5)
    result = Result(argv=args, returncode=proc.returncode, tail=list(tail))
    check_interrupted()
    if check and not result.ok:
        name = what or os.path.basename(args[0])
        raise BuildError(f"{name} failed with exit status {result.returncode}",
                         hint="\n".join(result.tail[-15:]) or None)
    return result


def output(argv: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None,
           what: str | None = None) -> str:
    """Run a short command and return its stdout; stderr is shown only on failure."""
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, env=child_env())
    except FileNotFoundError:
        raise BuildError(f"{args[0]}: command not found") from None
    if proc.returncode != 0:
        name = what or " ".join(args[:2])
        raise BuildError(f"{name} failed with exit status {proc.returncode}",
                         hint=proc.stderr.strip()[-2000:] or None)
    return proc.stdout


def run_interactive(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    log: IO[str] | None = None,
) -> Result:
    """Run argv on a pseudo-terminal of its own, wired to the user's terminal.

    For builds a person steps through (packer -debug, breakpoints, -on-error=ask): Packer only
    pauses and asks on a terminal. Its output still streams line by line to on_line and log,
    so the wrapper can tell the user how to log in to the VM. The user's terminal is put in raw
    mode for the duration; Ctrl-C reaches Packer through its terminal, as if run directly.
    """
    import pty
    import select
    import termios
    import tty

    args = [os.fspath(a) for a in argv]
    full_env = child_env(env)
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    pid, master = pty.fork()  # the child is a session leader: its pid is its process group
    if pid == 0:  # pragma: no cover - the child only execs
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.execvpe(args[0], args, full_env)  # noqa: S606 - an argv list, no shell
        finally:
            os._exit(127)
    with contextlib.suppress(OSError):
        import fcntl

        size = fcntl.ioctl(stdout_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
    tail: deque[str] = deque(maxlen=30)
    pending = b""
    interrupted = False
    stopped_at = 0.0
    escalated = 0
    terminal = True  # the user's terminal still answers
    inputs = [master, stdin_fd]
    with forwarded_signals() as stop:
        try:
            if saved is not None:
                tty.setraw(stdin_fd)
            while True:
                if stop.signum is not None and not interrupted:
                    interrupted, stopped_at = True, time.monotonic()
                    kill_group(pid, signal.SIGINT)
                if interrupted:
                    escalated = _escalate(pid, stopped_at, stop.count, escalated)
                try:
                    ready, _, _ = select.select(inputs, [], [], 0.2)
                except InterruptedError:
                    continue
                if stdin_fd in ready:
                    try:
                        data = os.read(stdin_fd, 1024)
                    except OSError:  # EIO: the terminal is gone
                        data = b""
                    if not data:
                        inputs.remove(stdin_fd)
                    elif b"\x03" in data:
                        interrupted, stopped_at = True, time.monotonic()
                    if data:
                        os.write(master, data)
                if master in ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the child closed its terminal
                        data = b""
                    if not data:
                        break
                    if terminal:
                        try:
                            os.write(stdout_fd, data)
                        except OSError:  # the terminal was lost: stop as on SIGHUP
                            terminal = False
                            if stop.signum is None:
                                stop(signal.SIGHUP, None)
                    if interrupted and _asks(pending + data):
                        # nobody is there to answer: Packer's own cleanup must still run
                        os.write(master, b"c\r" if ASK_CLEANUP in pending + data else b"\r")
                        data += b"\n"
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace").rstrip("\r")
                        tail.append(line)
                        if log is not None:
                            log.write(line + "\n")
                            log.flush()
                        if on_line is not None:
                            on_line(line)
        finally:
            if saved is not None:
                with contextlib.suppress(OSError, termios.error):
                    termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            os.close(master)
            _, status = os.waitpid(pid, 0)
            reap_group(pid)
    code = os.waitstatus_to_exitcode(status)
    if interrupted:
        _stop.signum = _stop.signum or signal.SIGINT
    result = Result(argv=args, returncode=code, tail=list(tail))
    check_interrupted()
    return result


def _asks(text: bytes) -> bool:
    """Whether Packer waits for an answer (a -debug pause, -on-error=ask's question)."""
    return ASK_ENTER in text or ASK_CLEANUP in text


def _escalate(pgid: int, stopped_at: float, count: int, escalated: int) -> int:
    """After SIGINT: SIGTERM on a second stop request or after the grace time, then SIGKILL."""
    waited = time.monotonic() - stopped_at
    if escalated == 0 and (waited > GRACE_SECONDS or count > 1):
        kill_group(pgid, signal.SIGTERM)
        escalated = 1
    if escalated == 1 and waited > GRACE_SECONDS + TERM_SECONDS:
        kill_group(pgid, signal.SIGKILL)
        escalated = 2
    return escalated


def say(text: str) -> None:
    """Print to the user's terminal, also while it is in raw mode (CR LF line ends)."""
    data = ("\r\n".join(text.split("\n")) + "\r\n").encode()
    with contextlib.suppress(OSError):  # a lost terminal: the build stops on its SIGHUP
        os.write(sys.stdout.fileno(), data)
