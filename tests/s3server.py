"""A real S3 server on 127.0.0.1 for tests: moto's standalone server (`moto_server`), started
in its own process group on a free port and stopped with it.

    with S3Server() as s3:
        s3.env          # AWS_* variables for boto3's default credential chain
        s3.client()     # a boto3 client for it
        s3.endpoint     # http://127.0.0.1:PORT
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from tests.servers import free_port

START_TIMEOUT = 30.0
# moto takes any key; these only show that the real chain (environment variables) is used
ACCESS_KEY = "AKIAOSIMAGETEST00001"
SECRET_KEY = "osimage-test-secret-key-do-not-log-0001"


class S3Server:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="osimage-s3-"))
        self.port = 0
        self.log = self.workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("moto_server") is not None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(self.workdir / "no-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-credentials")}

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(aws_access_key_id=ACCESS_KEY,
                                     aws_secret_access_key=SECRET_KEY).client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def start(self) -> None:
        moto = shutil.which("moto_server")
        assert moto is not None
        for _ in range(5):
            self.port = free_port()
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)],
                                              stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              env={**os.environ, **self.env})
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    requests.get(self.endpoint, timeout=1)
                    return
                except requests.RequestException:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"moto_server did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
