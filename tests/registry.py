"""A real OCI registry on 127.0.0.1 for tests: Debian's docker-registry (distribution 2.8)
with its own config, filesystem storage in a private folder, on a free port, plain HTTP.

    with Registry() as reg:
        reg.host          # "127.0.0.1:PORT": skopeo ... --dest-tls-verify=false docker://HOST/...

    Registry(login=("builder", "secret")) asks for that login (htpasswd, bcrypt) on every request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.servers import free_port

REGISTRY = "/usr/bin/docker-registry"
START_TIMEOUT = 10.0


class Registry:
    def __init__(self, login: tuple[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="osimage-registry-"))
        self.login = login
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return Path(REGISTRY).is_file()

    def start(self) -> None:
        for _ in range(5):  # a free port may be taken by the time the registry binds it
            self.port = free_port()
            config = self.dir / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log: {level: warn}\n"
                f"storage:\n  filesystem: {{rootdirectory: {self.dir / 'data'}}}\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n" + self._auth_config())
            log = (self.dir / "registry.log").open("ab")
            self._proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"docker-registry did not start: {self.dir / 'registry.log'}")

    def _auth_config(self) -> str:
        if self.login is None:
            return ""
        import bcrypt

        user, password = self.login
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        (self.dir / "htpasswd").write_text(f"{user}:{hashed}\n")
        return (f"auth:\n  htpasswd:\n    realm: osimage-test\n"
                f"    path: {self.dir / 'htpasswd'}\n")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return True
            except urllib.error.HTTPError as e:
                if e.code == 401 and self.login is not None:
                    return True  # it answers, and asks for the login
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def blob_count(self) -> int:
        """How many blobs the registry stores (a layer pushed twice is stored once)."""
        return len(list((self.dir / "data").rglob("blobs/sha256/*/*/data")))

    def manifest(self, image: str, tag: str) -> dict[str, Any]:
        """The image's manifest as the registry serves it (skopeo)."""
        out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{self.host}/osimage/{image}:{tag}"], check=True,
                             capture_output=True, text=True).stdout
        data: dict[str, Any] = json.loads(out)
        return data

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
