"""Before the VM starts: does the registry the OCI export is pushed to answer, and does it take
the credentials the push will use?

The same credentials as the push (osimage/features/exports.py): the site's registry.auth_file, else
OSIMAGE_REGISTRY_USERNAME/_PASSWORD, else skopeo's own auth files. They are sent to the
registry's /v2/ endpoint (Basic, or a token from the realm it names for Bearer), never logged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osimage import netreason
from osimage.errors import BuildError, ConfigError

if TYPE_CHECKING:
    import requests

    from osimage.build.context import BuildContext

TIMEOUT = 20.0
CREDENTIALS_HINT = ("set registry.auth_file in the site file, or OSIMAGE_REGISTRY_USERNAME and "
                    "OSIMAGE_REGISTRY_PASSWORD")


def registry(ctx: BuildContext) -> dict[str, Any] | None:
    reg: dict[str, Any] | None = ctx.site.data.get("registry")
    return reg


@contextlib.contextmanager
def auth_file(ctx: BuildContext) -> Any:
    """The --authfile for skopeo, or None to let skopeo use REGISTRY_AUTH_FILE / its default.
    A username and password from the environment go to a 0600 file in a private temp dir."""
    reg = registry(ctx) or {}
    if "auth_file" in reg:
        path = Path(reg["auth_file"])
        path = path if path.is_absolute() else ctx.root / path
        if not path.is_file():
            raise ConfigError(f"site file: registry.auth_file: {reg['auth_file']!r} does not "
                              "exist")
        yield path
        return
    user = os.environ.get("OSIMAGE_REGISTRY_USERNAME")
    password = os.environ.get("OSIMAGE_REGISTRY_PASSWORD")
    if not user or password is None:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="osimage-registry-"))  # 0700
    try:
        path = tmp / "auth.json"
        host = reg["url"].split("/", 1)[0]
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {host: {"auth": token}}}, f)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_check_registry(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    reg = registry(ctx)
    assert reg is not None
    host = str(reg["url"]).split("/", 1)[0]
    with auth_file(ctx) as auth:
        login = credentials(host, auth)
    ctx.reporter.info(f"    registry {host}: {check(host, reg.get('tls_verify', True), login)}")


def _auth_files(given: Path | None) -> list[Path]:
    """Where skopeo looks, in its order, when the push gives it no --authfile."""
    if given is not None:
        return [given]
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path("~").expanduser()
    return [*files, home / ".config" / "containers" / "auth.json", home / ".docker" /
            "config.json"]


def credentials(host: str, auth_file: Path | None) -> tuple[str, str] | None:
    """(user, password) for host from the auth file the push will use, None if none has it."""
    for path in _auth_files(auth_file):
        if not path.is_file():
            continue
        try:
            auths = json.loads(path.read_text()).get("auths", {})
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: not a readable containers auth file "
                              f"({getattr(e, 'strerror', None) or e})") from None
        for name, entry in auths.items() if isinstance(auths, dict) else ():
            if re.sub(r"^https?://", "", str(name)).split("/", 1)[0] != host:
                continue
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{path}: auths.{name}.auth: not base64 of USER:PASSWORD"
                                  ) from None
            return user, password
    return None


def check(host: str, tls_verify: bool, login: tuple[str, str] | None) -> str:
    """What the registry said, in a few words; BuildError if the push could not succeed."""
    import requests

    base, answer = _v2(host, tls_verify)
    if answer.status_code == 200:
        return "answers, no login needed"
    if answer.status_code != 401:
        raise BuildError(f"registry {host}: {base}/v2/ answered {answer.status_code} "
                         f"{answer.reason}", hint="check registry.url in the site file")
    if login is None:
        raise BuildError(f"registry {host} wants a login and no credentials were found for it",
                         hint=CREDENTIALS_HINT)
    challenge = answer.headers.get("WWW-Authenticate", "")
    try:
        if challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            got = _get(params.get("realm", ""), tls_verify, auth=login,
                       params={"service": params.get("service", host)})
        else:
            got = _get(f"{base}/v2/", tls_verify, auth=login)
    except requests.RequestException as e:
        raise BuildError(f"registry {host}: logging in failed: {netreason.reason(e)}") from None
    if got.status_code in (401, 403):
        raise BuildError(f"registry {host} refused the credentials of {login[0]!r} "
                         f"({got.status_code} {got.reason})", hint=CREDENTIALS_HINT)
    if got.status_code != 200:
        raise BuildError(f"registry {host}: logging in answered {got.status_code} {got.reason}")
    return f"answers, takes the credentials of {login[0]!r}"


def _v2(host: str, tls_verify: bool) -> tuple[str, requests.Response]:
    """GET /v2/ as skopeo would: https, and plain http too when TLS is not verified."""
    import requests

    failure: requests.RequestException | None = None
    for scheme in ("https", "http") if not tls_verify else ("https",):
        base = f"{scheme}://{host}"
        try:
            return base, _get(f"{base}/v2/", tls_verify)
        except requests.RequestException as e:
            failure = e
    assert failure is not None
    raise BuildError(f"registry {host}: {netreason.reason(failure)}",
                     hint="check registry.url in the site file and that the registry runs")


def _get(url: str, tls_verify: bool, **kw: Any) -> requests.Response:
    import requests
    import urllib3

    with warnings.catch_warnings():  # tls_verify: false was the site's choice: no warning
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        return requests.get(url, timeout=TIMEOUT, verify=tls_verify, **kw)
