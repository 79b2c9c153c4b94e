"""The registry's Distribution API, for what the Docker Engine cannot do: give an image
that is in the registry another name there, without pulling it through the build host.

    GET  /v2/<source>/manifests/<digest>                          the manifest's exact bytes
    POST /v2/<target>/blobs/uploads/?mount=<digest>&from=<source>  each layer and the config
    PUT  /v2/<target>/manifests/<tag>                              the same bytes: same digest

An image index (multi-platform, attestations) has each of its manifests copied
that way first, by digest. Within one repository only the manifest is put
under the new tag. Authentication is what the registry asks for in its
WWW-Authenticate challenge: Basic with the [registry] credentials, or a Bearer
token from the realm it names (Docker's token protocol), scoped to pull and push
the target and pull the source. Loopback registries are spoken to over plain
HTTP (as the Docker Engine does), every other one over HTTPS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx2

from daemon.config import RegistrySettings
from daemon.errors import Cancelled, DependencyUnreachable, RegistryError, UsageError

Line = Callable[[str], None]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_LIST, OCI_INDEX)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
# Layers a registry never holds (Windows base layers are fetched from their URLs).
FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",)
ATTEMPTS = 4
_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')
_LOOPBACK = re.compile(r"(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]+)?")


def split(repository: str) -> tuple[str, str]:
    """(registry host, repository path) of an image repository, by Docker's rule."""
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return "docker.io", repository if "/" in repository else f"library/{repository}"


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """A WWW-Authenticate header as (scheme in lower case, its parameters)."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def base_url(host: str) -> str:
    """Where the registry `host` answers: plain HTTP on loopback, HTTPS elsewhere."""
    if host == "docker.io":
        return "https://registry-1.docker.io"
    return f"http://{host}" if _LOOPBACK.fullmatch(host) else f"https://{host}"


class Registry:
    """One registry host, spoken to through its Distribution API."""

    def __init__(
        self,
        settings: RegistrySettings,
        *,
        timeout: float = 30.0,
        backoff: float = 0.5,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        self.settings = settings
        self.backoff = backoff
        self._client = httpx2.Client(
            timeout=timeout, follow_redirects=False, event_hooks=dict(event_hooks or {})
        )
        self._authorization: str | None = None
        self._scope = ""
        self._host = ""
        self._base = ""

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def copy(
        self,
        source: str,
        digest: str,
        target: str,
        tag: str,
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str:
        """Make `target:tag` name the image `source@digest`, registry-side; return its digest.

        The digest is the same in both repositories (the manifest's bytes are put
        unchanged), and the layers are mounted, not uploaded: nothing of the
        image passes through this host but its manifests.
        """
        host, src = split(source)
        target_host, dst = split(target)
        if target_host != host:
            raise UsageError(
                f"{source} and {target} are on different registries ({host}, {target_host}): "
                "an image is copied only within one registry."
            )
        self._base = base_url(host)
        self._host = host
        self._scope = f"repository:{dst}:pull,push repository:{src}:pull"
        if src != dst:
            on_line(f"copying {digest} from {src} to {dst} in {host} (blobs mounted, not pulled)")
        got = self._manifest(src, dst, digest, on_line, stop)
        put = self._put_manifest(dst, tag, got)
        if put != digest:
            raise RegistryError(
                f"the registry stored {dst}:{tag} as {put}, not {digest}; it rewrote the manifest."
            )
        on_line(f"{tag}: digest: {digest}")
        return digest

    # -- manifests and blobs -----------------------------------------------------

    def _manifest(
        self, src: str, dst: str, digest: str, on_line: Line, stop: threading.Event | None
    ) -> tuple[bytes, str]:
        """Fetch `src@digest` and make everything it refers to exist in `dst`."""
        _stopped(stop)
        resp = self._send(
            "GET",
            f"/v2/{src}/manifests/{digest}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        if resp.status_code == 404:
            raise RegistryError(
                f"{src}@{digest} is not in the registry any more (deleted or garbage-collected): "
                "deploy it again to promote it."
            )
        self._ok(resp, f"reading the manifest {src}@{digest}")
        body = resp.content
        if digest.startswith("sha256:") and "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"the registry answered for {src}@{digest} with another manifest.")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RegistryError(f"the manifest {src}@{digest} is not JSON.") from exc
        media = str(doc.get("mediaType") or resp.headers.get("Content-Type", "")).split(";")[0]
        if media in INDEX_TYPES:
            for child in doc.get("manifests") or []:
                child_digest = str(child["digest"])
                if src != dst:
                    self._put_manifest(
                        dst, child_digest, self._manifest(src, dst, child_digest, on_line, stop)
                    )
        elif src != dst:
            blobs = [doc.get("config") or {}, *(doc.get("layers") or [])]
            for blob in blobs:
                if blob.get("digest") and blob.get("mediaType") not in FOREIGN:
                    _stopped(stop)
                    self._mount(src, dst, str(blob["digest"]), on_line)
        return body, media

    def _mount(self, src: str, dst: str, digest: str, on_line: Line) -> None:
        if self._send("HEAD", f"/v2/{dst}/blobs/{digest}").status_code == 200:
            on_line(f"{digest[7:19]}: Layer already exists")
            return
        resp = self._send(
            "POST", f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": src}
        )
        if resp.status_code == 201:
            on_line(f"{digest[7:19]}: Mounted from {src}")
            return
        if resp.status_code == 202:  # it opened an upload instead: give it up
            location = resp.headers.get("Location")
            if location:
                self._send("DELETE", location)
            raise RegistryError(
                f"the registry would not mount {digest} from {src} into {dst} (it offered an "
                "upload instead); deployd copies images only registry-side, so nothing was "
                "copied. Check that the credentials may pull the source repository."
            )
        self._ok(resp, f"mounting {digest} from {src} into {dst}")

    def _put_manifest(self, dst: str, reference: str, manifest: tuple[bytes, str]) -> str:
        body, media = manifest
        resp = self._send(
            "PUT", f"/v2/{dst}/manifests/{reference}", content=body, headers={"Content-Type": media}
        )
        self._ok(resp, f"putting the manifest {dst}:{reference}")
        return resp.headers.get("Docker-Content-Digest") or (
            "sha256:" + hashlib.sha256(body).hexdigest()
        )

    # -- requests, authentication, errors ------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """One request, authenticated as the registry asks, transient failures retried."""
        url = path if path.startswith(("http://", "https://")) else self._base + path
        last = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                resp = self._request(method, url, **kwargs)
                if resp.status_code == 401:
                    self._authorization = self._authorize(resp)
                    resp = self._request(method, url, **kwargs)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                last = f"{resp.status_code} {resp.reason_phrase}"
            except httpx2.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < ATTEMPTS:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise DependencyUnreachable(
            f"the registry {self._host} could not be reached after {ATTEMPTS} attempts: {last}"
        )

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx2.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self._authorization:
            headers["Authorization"] = self._authorization
        return self._client.request(method, url, headers=headers, **kwargs)

    def _credentials(self) -> tuple[str, str] | None:
        """The [registry] credentials, if they are for this registry host."""
        s = self.settings
        if not s.username or s.password is None:
            return None
        if s.url and s.url.split("/", 1)[0] != self._host:
            return None
        return s.username, s.password

    def _authorize(self, resp: httpx2.Response) -> str:
        """The Authorization header that answers the registry's challenge."""
        scheme, params = challenge(resp.headers.get("WWW-Authenticate", ""))
        credentials = self._credentials()
        if scheme == "basic":
            if credentials is None:
                raise RegistryError(
                    f"the registry {self._host} asks for a login: set [registry] url, "
                    "username and password_file."
                )
            return _basic(*credentials)
        if scheme == "bearer" and params.get("realm"):
            query: list[tuple[str, str | int | float | bool | None]] = [
                ("scope", scope) for scope in self._scope.split()
            ]
            if params.get("service"):
                query.insert(0, ("service", params["service"]))
            try:
                token = self._client.get(
                    params["realm"],
                    params=query,
                    headers={"Authorization": _basic(*credentials)} if credentials else None,
                )
            except httpx2.TransportError as exc:
                raise DependencyUnreachable(
                    f"the registry's token service {params['realm']} could not be reached: {exc}"
                ) from exc
            if token.status_code in (401, 403):
                raise RegistryError(
                    f"the registry {self._host} refused the login: check [registry] username "
                    "and password_file."
                )
            self._ok(token, "getting a registry token")
            data = token.json()
            value = data.get("token") or data.get("access_token")
            if not value:
                raise RegistryError(
                    f"the registry's token service gave no token ({params['realm']})."
                )
            return f"Bearer {value}"
        raise RegistryError(
            f"the registry {self._host} asks for an authentication deployd does not speak "
            f"({scheme or 'none named'})."
        )

    def _ok(self, resp: httpx2.Response, doing: str) -> None:
        if resp.status_code < 300:
            return
        detail = _errors(resp)
        if resp.status_code in (401, 403):
            raise RegistryError(
                f"the registry {self._host} refused {doing}: {detail}; check [registry] "
                "username and password_file."
            )
        raise RegistryError(f"the registry {self._host} failed {doing}: {detail}")


def _errors(resp: httpx2.Response) -> str:
    """The registry's error answer in one line (its `errors` list, else the status)."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return " ".join((text or f"{resp.status_code} {resp.reason_phrase}").split())[:300]


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("stopped: the deploy was cancelled.")
