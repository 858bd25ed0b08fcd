"""S3 for OpenCHAMI: a build's diskless boot files (squashfs, kernel, initramfs) in a bucket.

OpenCHAMI boots nodes from objects in S3 (its BSS hands out their HTTP URLs). A site names it:

    s3:
      endpoint: http://s3.example:9000   # the S3 API, also the base of the URLs nodes boot from
      bucket: boot-images
      prefix: osimage                    # objects: PREFIX/IMAGE/VERSION/NAME
      region: us-east-1                  # optional

Credentials come from boto3's default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/credentials and config): never from argv or the site file, never logged.
Uploads are multipart (TransferConfig); each object carries the sha256 recorded at build time
as metadata (x-amz-meta-sha256). After an upload, a HEAD checks what arrived: size and sha256.
An object already there with the same size and sha256 metadata is not sent again. release
verify HEADs each object and re-reads it, hashing the stream: a changed object is found even
when its metadata was kept. Addressing is path-style (ENDPOINT/BUCKET/KEY), as MinIO, Ceph RGW
and OpenCHAMI's own S3 serve it.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from osimage import netreason
from osimage.errors import BuildError, ConfigError
from osimage.publish.artifacts import CHUNK, Artifact
from osimage.publish.mirrorlock import refuse_replacing
from osimage.runner import check_interrupted
from osimage.sizes import human

KINDS = ("squashfs", "kernel", "initramfs")  # what OpenCHAMI boots from
PART = 16 << 20
DEFAULT_REGION = "us-east-1"
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                    "write ~/.aws/credentials")
SHOWN = "site file: s3"


@dataclass(frozen=True)
class S3Site:
    endpoint: str
    bucket: str
    prefix: str = ""
    region: str | None = None

    @classmethod
    def from_site(cls, data: Mapping[str, Any]) -> S3Site | None:
        s3 = data.get("s3")
        if not s3:
            return None
        return cls(endpoint=str(s3["endpoint"]).rstrip("/"), bucket=str(s3["bucket"]),
                   prefix=str(s3.get("prefix", "")).strip("/"), region=s3.get("region"))

    def key(self, image: str, version: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, image, version, name) if p)

    def url(self, key: str) -> str:
        """The object's HTTP URL (path-style): what BSS hands the nodes."""
        return f"{self.endpoint}/{self.bucket}/{urllib.parse.quote(key)}"


@dataclass(frozen=True)
class Uploaded:
    url: str
    sent: bool  # False: the same bytes were there already


def _client(endpoint: str, region: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"{SHOWN}: boto3 is not installed",
                          hint="pip install 'osimage[s3]'") from None
    config = Config(s3={"addressing_style": "path"}, connect_timeout=15, read_timeout=120,
                    retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint,
                                           region_name=region or DEFAULT_REGION, config=config)


def _why(e: Exception) -> tuple[str, str]:
    """(S3 error code or exception kind, a few words) of a boto3 failure."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode", ""))
        return code, str(error.get("Message") or code)
    return type(e).__name__, netreason.reason(e)


def _fail(e: Exception, what: str, site: S3Site) -> Exception:
    """One clear error for a failed S3 call: usage problems (no bucket, no access, no
    credentials) are ConfigError, the rest (unreachable, a server error) BuildError."""
    code, why = _why(e)
    if code == "NoCredentialsError":
        return ConfigError(f"{SHOWN}: no AWS credentials found for {site.endpoint}",
                           hint=CREDENTIALS_HINT)
    if code in ("404", "NoSuchBucket"):
        return ConfigError(f"{SHOWN}.bucket: no bucket {site.bucket!r} at {site.endpoint}",
                           hint="create it, or correct s3.bucket in the site file")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return ConfigError(f"{SHOWN}: {site.endpoint} refused access to bucket "
                           f"{site.bucket!r} ({why})", hint=CREDENTIALS_HINT)
    return BuildError(f"s3 {site.endpoint}: {what} failed: {why}",
                      hint="check s3.endpoint in the site file and that the server is up")


def _errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def check(site: S3Site) -> str:
    """Before the VM starts: the bucket exists and these credentials may use it."""
    client = _client(site.endpoint, site.region)
    try:
        client.head_bucket(Bucket=site.bucket)
    except _errors() as e:
        raise _fail(e, f"reaching bucket {site.bucket!r}", site) from None
    return f"bucket {site.bucket} at {site.endpoint}"


def _head(client: Any, bucket: str, key: str) -> tuple[int, str] | None:
    """(size, sha256 metadata) of an object, None if there is none."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except _errors() as e:
        if _why(e)[0] in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return int(head["ContentLength"]), str((head.get("Metadata") or {}).get("sha256", ""))


def upload(site: S3Site, files: Sequence[Artifact], image: str, version: str,
           say: Callable[[str], None] = lambda _: None, replace: bool = False
           ) -> dict[str, Uploaded]:
    """Put each file at PREFIX/IMAGE/VERSION/NAME (multipart), its sha256 as metadata; skip
    one whose object has the same size and sha256 already; HEAD each after its upload. An
    object of other bytes is replaced only with replace (--replace), as on the mirror: then
    nothing is sent."""
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                              max_concurrency=4, use_threads=True)
    client = _client(site.endpoint, site.region)
    there: dict[str, tuple[int, str] | None] = {}
    for a in files:
        key = site.key(image, version, a.name)
        try:
            there[a.name] = _head(client, site.bucket, key)
        except _errors() as e:
            raise _fail(e, f"reading s3://{site.bucket}/{key}", site) from None
    changed = [a.name for a in files if there[a.name] not in (None, (a.size, a.sha256))]
    if changed and not replace:
        raise refuse_replacing(f"s3://{site.bucket}/{site.key(image, version, '')}", changed)
    out: dict[str, Uploaded] = {}
    for a in files:
        check_interrupted()
        key = site.key(image, version, a.name)
        url = site.url(key)
        if there[a.name] == (a.size, a.sha256):
            say(f"    {a.name}: already in s3://{site.bucket}/{key}")
            out[a.name] = Uploaded(url, sent=False)
            continue
        try:
            client.upload_file(str(a.path), site.bucket, key, Config=transfer,
                               ExtraArgs={"Metadata": {"sha256": a.sha256},
                                          "ContentType": "application/octet-stream"})
            arrived = _head(client, site.bucket, key)
        except _errors() as e:
            raise _fail(e, f"uploading {a.name} to s3://{site.bucket}/{key}", site) from None
        if arrived != (a.size, a.sha256):
            size, digest = arrived or (0, "")
            raise BuildError(f"s3 {site.endpoint}: s3://{site.bucket}/{key} holds {size} bytes "
                             f"with sha256 {digest or 'none'} after the upload, expected "
                             f"{a.size} bytes, {a.sha256}")
        say(f"    {a.name}: {human(a.size)} to {url}")
        out[a.name] = Uploaded(url, sent=True)
    return out


def split_url(url: str) -> tuple[str, str, str]:
    """(endpoint, bucket, key) of a path-style object URL, as url() makes them."""
    parts = urllib.parse.urlsplit(url)
    bucket, _, key = parts.path.lstrip("/").partition("/")
    if parts.scheme not in ("http", "https") or not bucket or not key:
        raise ConfigError(f"{url!r}: not an S3 object URL (http[s]://ENDPOINT/BUCKET/KEY)")
    return f"{parts.scheme}://{parts.netloc}", bucket, urllib.parse.unquote(key)


def measure(url: str, size: int, sha256: str, region: str | None = None) -> str | None:
    """What is wrong with the object at url (None: it has size bytes hashing to sha256): its
    HEAD (size, sha256 metadata), then its bytes, streamed and hashed."""
    endpoint, bucket, key = split_url(url)
    client = _client(endpoint, region)
    site = S3Site(endpoint, bucket)
    try:
        head = _head(client, bucket, key)
        if head is None:
            return "missing in S3"
        if head[0] != size:
            return f"{head[0]} bytes in S3, expected {size}"
        if head[1] != sha256:
            return f"sha256 metadata {head[1][:12] or 'none'}..., expected {sha256[:12]}..."
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        h = hashlib.sha256()
        got = 0
        with body:
            while chunk := body.read(CHUNK):
                h.update(chunk)
                got += len(chunk)
                check_interrupted()
    except _errors() as e:
        raise _fail(e, f"reading s3://{bucket}/{key}", site) from None
    if got != size:
        return f"served {got} bytes, expected {size}"
    if h.hexdigest() != sha256:
        return f"sha256 {h.hexdigest()[:12]}... in S3, expected {sha256[:12]}..."
    return None
