"""Adapter to the Docker Engine and the registry: build, run sandboxed checks, push, prune.

The docker SDK's exceptions are translated here, where they enter: an Engine
or registry that cannot be reached becomes DependencyUnreachable (exit 4), a
refused login RegistryError, a failed build BuildError with the failing
instruction and the tail of its output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from daemon.adapters import dockerfile, dockerignore
from daemon.adapters.background import StreamCutter
from daemon.adapters.registry import Registry
from daemon.adapters.streams import Lines
from daemon.config import DockerSettings, RegistrySettings
from daemon.core.ports import (
    LABEL_COMMIT,
    LABEL_DEPLOY_ID,
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    STAGING_TAG,
    ContainerRun,
    Sandbox,
)
from daemon.errors import (
    BuildError,
    Cancelled,
    DependencyUnreachable,
    DeploydError,
    RegistryError,
)

__all__ = ["LABEL_COMMIT", "LABEL_DEPLOYMENT", "LABEL_DEPLOY_ID", "STAGING_TAG", "Images"]

log = logging.getLogger(__name__)

API_VERSION = "1.41"
PUSH_ATTEMPTS = 4
# A failed push attempt that took longer than this was retried by the Engine already.
ENGINE_RETRIED_SECONDS = 20.0
_AUTH_PATTERNS = re.compile(
    r"unauthorized|authentication required|denied|forbidden|"
    r"no basic auth credentials|401|403",
    re.IGNORECASE,
)
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
# The legacy builder's bookkeeping lines; kept for error tails, not shown.
_BUILD_NOISE = re.compile(r"^( ---> |Removing intermediate container |Successfully built )")
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})$")

Line = Callable[[str], None]


class Images:
    """The Docker Engine (and through it, the registry) as deployd uses them."""

    def __init__(
        self, engine: DockerSettings, registry: RegistrySettings, *, push_backoff: float = 0.5
    ) -> None:
        self.host = engine.host
        self.allow_remote_add = engine.allow_remote_add
        self.registry = registry
        self.push_backoff = push_backoff
        self._api: docker.APIClient | None = None
        self._ncpu: int | None = None

    @property
    def api(self) -> docker.APIClient:
        if self._api is None:
            try:
                self._api = docker.APIClient(base_url=self.host, version=API_VERSION, timeout=300)
            except docker.errors.DockerException as exc:
                raise self._unreachable(exc) from exc
        return self._api

    def _unreachable(self, exc: BaseException) -> DependencyUnreachable:
        return DependencyUnreachable(
            f"the Docker Engine at {self.host} could not be reached ({_short(exc)}); "
            "check that dockerd runs and [docker] host is right."
        )

    @contextlib.contextmanager
    def _engine(self) -> Iterator[None]:
        try:
            yield
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise self._unreachable(exc) from exc
        except docker.errors.APIError as exc:
            raise DeploydError(f"the Docker Engine refused a request: {_short(exc)}") from exc

    @contextlib.contextmanager
    def _stream_client(
        self, stop: threading.Event | None, on_cut: Callable[[], None] | None = None
    ) -> Iterator[docker.APIClient]:
        """A client of its own for one long stream (requests sessions are not shared
        between threads). When `stop` is set its streams are cut (then `on_cut` runs),
        and an error after that reads as Cancelled."""
        try:
            client = docker.APIClient(base_url=self.host, version=API_VERSION, timeout=300)
        except docker.errors.DockerException as exc:
            raise self._unreachable(exc) from exc
        cutter = StreamCutter(client, stop, on_cut) if stop is not None else None
        try:
            yield client
        except (
            requests.exceptions.RequestException,
            docker.errors.APIError,
            urllib3.exceptions.HTTPError,  # docker-py reads the raw stream: a cut shows as this
        ) as exc:
            if stop is not None and stop.is_set():
                raise Cancelled("stopped: the deploy was cancelled.") from exc
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise self._unreachable(exc) from exc
            raise
        finally:
            if cutter is not None:
                cutter.close()
            client.close()

    def ping(self) -> None:
        """Raise DependencyUnreachable unless the Engine answers."""
        with self._engine():
            try:
                self.api.ping()
            except docker.errors.APIError as exc:
                raise self._unreachable(exc) from exc

    # -- build ----------------------------------------------------------------

    def build(
        self,
        context: Path,
        tag: str,
        labels: dict[str, str],
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str:
        """Build `context` with its Dockerfile (.dockerignore honoured); return the image id.

        The context is the tar the docker CLI would send (dockerignore.py), not
        docker-py's, whose .dockerignore matching differs from Docker's.
        """
        if not (context / "Dockerfile").is_file():
            raise BuildError(
                "the project has no Dockerfile at its root; add one (an Astro "
                "project's is one line: FROM <runtime image>)."
            )
        tail: deque[str] = deque(maxlen=25)
        current_step = ""
        image_id = ""
        # The build step's container ("Running in <id>"): killed if the deploy stops,
        # so that nothing of the build runs on, even on an Engine behind a proxy that
        # does not pass the closed connection on.
        running: list[str] = []
        name = dockerfile.labelled(context, labels, self.allow_remote_add)
        with (
            dockerignore.context_tar(context, name) as body,
            self._engine(),
            self._stream_client(stop, lambda: self._kill_build_step(running)) as client,
        ):
            if stop is not None and stop.is_set():
                raise Cancelled("stopped: the deploy was cancelled.")
            try:
                stream = client.build(
                    fileobj=body,
                    custom_context=True,
                    encoding=None,
                    tag=tag,
                    dockerfile=name,
                    rm=True,
                    forcerm=True,
                    decode=True,
                    pull=False,
                )
                for chunk in stream:
                    if "stream" in chunk:
                        for line in str(chunk["stream"]).splitlines():
                            if not line.strip():
                                continue
                            if _STEP.match(line):
                                current_step = line
                            elif m := _RUNNING_IN.match(line):
                                running[:] = [m.group(1)]
                            tail.append(line)
                            if not _BUILD_NOISE.match(line):
                                on_line(line)
                    if "aux" in chunk and isinstance(chunk["aux"], dict):
                        image_id = str(chunk["aux"].get("ID", image_id))
                    if "errorDetail" in chunk or "error" in chunk:
                        detail = chunk.get("errorDetail") or {}
                        message = str(detail.get("message") or chunk.get("error") or "").strip()
                        on_line(message)
                        if _KILLED.search(message) and not self._answers():
                            # Killed because the Engine is stopping (a restart): not the
                            # project's fault, and the next deploy may work as it is.
                            raise DependencyUnreachable(
                                f"the Docker Engine at {self.host} stopped during the build "
                                f"({current_step or 'its start'} was killed); check that "
                                "dockerd runs, then deploy again."
                            )
                        raise BuildError(
                            f"the build failed at {current_step or 'its start'}: {message}",
                            tail="\n".join(tail),
                        )
            except docker.errors.APIError as exc:
                raise BuildError(
                    f"the Docker Engine refused the build: {_short(exc)}", tail="\n".join(tail)
                ) from exc
        if not image_id:
            image_id = str(self.api.inspect_image(tag)["Id"])
        return image_id

    def _answers(self) -> bool:
        """Whether the Engine answers a ping within a few seconds (after a moment: a stopping
        Engine kills its containers, then stops answering)."""
        time.sleep(0.5)
        try:
            client = docker.APIClient(base_url=self.host, version=API_VERSION, timeout=3)
        except docker.errors.DockerException:
            return False
        try:
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False
        finally:
            client.close()
        return True

    def _kill_build_step(self, running: list[str]) -> None:
        """Remove the container of the build step that runs now, if any (the build stopped)."""
        if not running:
            return
        try:
            client = docker.APIClient(base_url=self.host, version=API_VERSION, timeout=30)
        except docker.errors.DockerException:
            return
        with (
            client,
            contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException),
        ):
            client.remove_container(running[0], force=True)

    def workdir(self, image: str) -> str:
        """The image's WORKDIR (where an Astro image keeps the project), or /usr/local/airflow."""
        with self._engine():
            config = self.api.inspect_image(image).get("Config") or {}
        return str(config.get("WorkingDir") or "/usr/local/airflow")

    # -- checks ---------------------------------------------------------------

    def _sandbox_config(self, sandbox: Sandbox, source: str, mount_at: str) -> dict[str, Any]:
        """The host config of a check container: no network, limits, read-only root."""
        cpus = min(sandbox.cpus, float(self.ncpu()))
        return dict(
            self.api.create_host_config(
                network_mode="none",
                mem_limit=f"{sandbox.memory_mb}m",
                memswap_limit=f"{sandbox.memory_mb}m",
                nano_cpus=int(cpus * 1e9),
                pids_limit=sandbox.pids,
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={sandbox.scratch_mb}m,mode=1777"},
                binds={source: {"bind": mount_at, "mode": "ro"}},
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                init=True,
            )
        )

    def run_sandboxed(
        self,
        image: str,
        argv: list[str],
        *,
        project: Path,
        mount_at: str,
        environment: dict[str, str],
        sandbox: Sandbox,
        labels: dict[str, str],
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> ContainerRun:
        """Run `argv` in a container of `image` with no network and the sandbox's limits.

        The project directory is bind-mounted read-only at `mount_at`; the root
        filesystem is read-only with a tmpfs scratch at /tmp. The container is
        removed on every path.
        """
        # A local Engine sees our work dir; a remote one gets the files in a volume
        # (it refuses copies into a read-only root, and cannot see our paths).
        source = str(project) if self.local else self._project_volume(image, project, labels)
        host_config = self._sandbox_config(sandbox, source, mount_at)
        with self._engine():
            try:
                container = self.api.create_container(
                    image,
                    command=argv[1:],
                    entrypoint=argv[:1],
                    working_dir=mount_at,
                    environment=environment,
                    labels={**labels, LABEL_ROLE: "check"},
                    network_disabled=True,
                    host_config=host_config,
                )
            except docker.errors.APIError as exc:
                raise DependencyUnreachable(
                    f"the Docker Engine could not create the check container: {_short(exc)}"
                ) from exc
            cid = container["Id"]
            try:
                return self._run(cid, sandbox, on_line, stop)
            finally:
                with contextlib.suppress(
                    docker.errors.APIError, requests.exceptions.RequestException
                ):
                    self.api.remove_container(cid, force=True)
                    if source != str(project):
                        self.api.remove_volume(source, force=True)

    @property
    def local(self) -> bool:
        """Whether the Engine runs on this host (and can bind-mount our work dirs)."""
        return self.host.startswith("unix://")

    def _project_volume(self, image: str, project: Path, labels: dict[str, str]) -> str:
        """Copy the project into a new labelled volume on the Engine; return its name."""
        name = f"deployd-project-{labels.get(LABEL_DEPLOY_ID, '0')}-{os.urandom(4).hex()}"
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            tar.add(str(project), arcname=".")
        with self._engine():
            self.api.create_volume(name=name, labels={**labels, LABEL_ROLE: "project"})
            helper = self.api.create_container(
                image,
                command=["true"],
                network_disabled=True,
                labels={**labels, LABEL_ROLE: "copy"},
                host_config=self.api.create_host_config(
                    network_mode="none", binds={name: {"bind": "/deployd-project", "mode": "rw"}}
                ),
            )
            try:
                if not self.api.put_archive(helper["Id"], "/deployd-project", data.getvalue()):
                    raise DeploydError("the Docker Engine refused the project's files.")
            finally:
                self.api.remove_container(helper["Id"], force=True)
        return name

    def _run(
        self, cid: str, sandbox: Sandbox, on_line: Line, stop: threading.Event | None
    ) -> ContainerRun:
        self.api.start(cid)
        reader = threading.Thread(target=self._read_logs, args=(cid, on_line), daemon=True)
        reader.start()
        deadline = time.monotonic() + sandbox.timeout_seconds
        timed_out = False
        exit_code: int | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                timed_out = left <= 0
                with contextlib.suppress(docker.errors.APIError):
                    self.api.kill(cid)
                break
            try:
                # Short waits: a stopped deploy's container is killed within a quarter second.
                result = self.api.wait(cid, timeout=min(left, 0.25))
                exit_code = int(result.get("StatusCode", -1))
                break
            except requests.exceptions.ReadTimeout:
                continue
            except requests.exceptions.ConnectionError as exc:
                if "timed out" in str(exc).lower():
                    continue
                raise
        reader.join(timeout=10)
        state = self.api.inspect_container(cid).get("State") or {}
        return ContainerRun(
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=bool(state.get("OOMKilled")),
        )

    def _read_logs(self, cid: str, on_line: Line) -> None:
        lines = Lines()
        try:
            for chunk in self.api.logs(cid, stream=True, follow=True, stdout=True, stderr=True):
                for line in lines.feed(chunk):
                    on_line(line)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.warning("reading container logs of %s stopped: %s", cid[:12], exc)
        for line in lines.close():
            on_line(line)

    def ncpu(self) -> int:
        """CPUs of the Docker host (a check may not ask for more)."""
        if self._ncpu is None:
            with self._engine():
                self._ncpu = int(self.api.info().get("NCPU") or 1)
        return self._ncpu

    def remove_containers(self, labels: dict[str, str]) -> int:
        """Force-remove every container (and project volume) carrying all of `labels`."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        removed = 0
        with self._engine():
            for c in self.api.containers(all=True, filters=filters):
                with contextlib.suppress(docker.errors.NotFound):
                    self.api.remove_container(c["Id"], force=True)
                    removed += 1
            for v in (self.api.volumes(filters=filters) or {}).get("Volumes") or []:
                with contextlib.suppress(docker.errors.NotFound):
                    self.api.remove_volume(v["Name"], force=True)
        return removed

    # -- registry -------------------------------------------------------------

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        """Tag a local image."""
        with self._engine():
            self.api.tag(image_id, repository, tag, force=True)

    def untag(self, repository: str, tag: str) -> None:
        """Remove a local tag (the image stays if other tags name it)."""
        with self._engine(), contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.api.remove_image(f"{repository}:{tag}", noprune=True)

    def push(
        self, repository: str, tag: str, on_line: Line, stop: threading.Event | None = None
    ) -> str:
        """Push `repository:tag`; return its digest. Transient errors are retried with backoff."""
        host = registry_host(repository)
        last, refused_once = "", False
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                return self._push_once(repository, tag, on_line, stop)
            except RegistryError as exc:
                # Refused credentials are final, but for one more try: an Engine whose ping
                # met a failing registry (500s) sends its next upload without them.
                if refused_once:
                    raise
                refused_once = True
                on_line(f"{exc.message}; trying once more")
                continue
            except _TransientPush as exc:
                last = str(exc)
                took = time.monotonic() - started
                if took > ENGINE_RETRIED_SECONDS:
                    # The Engine retries a layer upload itself (5 times, about 50 s):
                    # retrying that again would only multiply the wait.
                    raise DependencyUnreachable(
                        f"the registry {host} kept failing for {took:.0f} s (the Docker "
                        f"Engine's own retries): {last}"
                    ) from exc
                if attempt < PUSH_ATTEMPTS:
                    wait = self.push_backoff * 2 ** (attempt - 1)
                    on_line(
                        f"registry error ({last}); retrying in {wait:.1f} s "
                        f"(attempt {attempt + 1} of {PUSH_ATTEMPTS})"
                    )
                    if stop is not None and stop.wait(wait):
                        raise Cancelled("stopped: the deploy was cancelled.") from exc
                    if stop is None:
                        time.sleep(wait)
        raise DependencyUnreachable(
            f"the registry {host} could not be reached after {PUSH_ATTEMPTS} attempts: {last}"
        )

    def _auth(self, repository: str) -> dict[str, str] | None:
        if not self.registry.username or self.registry.password is None:
            return None
        host = registry_host(repository)
        if self.registry.url and self.registry.url.split("/", 1)[0] != host:
            return None
        return {
            "username": self.registry.username,
            "password": self.registry.password,
            "serveraddress": host,
        }

    def _push_once(
        self, repository: str, tag: str, on_line: Line, stop: threading.Event | None
    ) -> str:
        digest = ""
        shown: set[tuple[str, str]] = set()
        try:
            with self._stream_client(stop) as client:
                digest = self._push_stream(client, repository, tag, on_line, shown)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise self._unreachable(exc) from exc
        except docker.errors.APIError as exc:
            message = _short(exc)
            if _AUTH_PATTERNS.search(message):
                raise RegistryError(f"the registry refused the push: {message}") from exc
            raise _TransientPush(message) from exc
        if not digest:
            raise _TransientPush("the push ended without a digest")
        return digest

    def _push_stream(
        self,
        client: docker.APIClient,
        repository: str,
        tag: str,
        on_line: Line,
        shown: set[tuple[str, str]],
    ) -> str:
        digest = ""
        stream = client.push(
            repository, tag=tag, stream=True, decode=True, auth_config=self._auth(repository)
        )
        for event in stream:
            if "errorDetail" in event or "error" in event:
                message = str((event.get("errorDetail") or {}).get("message") or event.get("error"))
                if _AUTH_PATTERNS.search(message):
                    raise RegistryError(
                        f"the registry {registry_host(repository)} refused the push: "
                        f"{message}; check [registry] username and password_file."
                    )
                raise _TransientPush(message)
            aux = event.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            status = str(event.get("status") or "")
            ident = str(event.get("id") or "")
            if status in ("Pushed", "Layer already exists") or status.startswith("Mounted from"):
                if (ident, status) not in shown:
                    shown.add((ident, status))
                    on_line(f"{ident}: {status}")
            elif status and "digest:" in status:
                on_line(status)
        return digest

    def local_image(self, reference: str, on_line: Line) -> tuple[str, str]:
        """The local image id of `reference` (IMAGE@DIGEST or IMAGE:TAG) and its digest
        in the registry; pulled, with [registry]'s credentials, if this Engine no longer
        has it (pruned by keep_images, or built on another host)."""
        repository, _, pinned = reference.partition("@")
        if repository.rfind(":") > repository.rfind("/"):
            repository = repository.rsplit(":", 1)[0]  # IMAGE:TAG
        if pinned:
            reference = f"{repository}@{pinned}"  # IMAGE:TAG@DIGEST: the digest decides
        with self._engine():
            try:
                info = self.api.inspect_image(reference)
            except docker.errors.ImageNotFound:
                on_line(f"       pulling {reference}: this Docker Engine no longer has it")
                self._pull(reference, repository)
                info = self.api.inspect_image(reference)
        named = (str(d).split("@", 1) for d in info.get("RepoDigests") or [])
        digest = next((d for repo, d in named if repo == repository), "")
        digest = digest or pinned
        return str(info["Id"]), digest

    def _pull(self, reference: str, repository: str) -> None:
        try:
            for event in self.api.pull(
                reference, stream=True, decode=True, auth_config=self._auth(repository)
            ):
                if isinstance(event, dict) and ("error" in event or "errorDetail" in event):
                    detail = (event.get("errorDetail") or {}).get("message") or event.get("error")
                    raise RegistryError(f"cannot pull {reference}: {_short(Exception(detail))}")
        except docker.errors.APIError as exc:
            raise RegistryError(f"cannot pull {reference}: {_short(exc)}") from exc

    # -- housekeeping ---------------------------------------------------------

    def prune(self, labels: dict[str, str], keep: int) -> list[str]:
        """Remove local images with `labels` (one deployment of one deployd) beyond the newest
        `keep` (by deploy id)."""
        with self._engine():
            images = self.api.images(filters={"label": [f"{k}={v}" for k, v in labels.items()]})

        def deploy_no(img: dict[str, Any]) -> int:
            value = (img.get("Labels") or {}).get(LABEL_DEPLOY_ID, "0")
            return int(value) if str(value).isdecimal() else 0

        images.sort(key=deploy_no, reverse=True)
        removed = []
        for img in images[keep:]:
            try:
                self.api.remove_image(img["Id"], force=True)
                removed.append(str(img["Id"]))
            except docker.errors.APIError as exc:
                log.info("kept image %s: %s", img["Id"][:19], _short(exc))
        return removed

    def retag(
        self,
        source: str,
        digest: str,
        target: str,
        tag: str,
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str:
        """Tag `source@digest` as `target:tag` in the registry itself; return the digest.

        Across repositories the layers are mounted registry-side (adapters/registry.py):
        nothing is pulled to, or pushed from, the Engine.
        """
        with Registry(self.registry, backoff=self.push_backoff) as registry:
            return registry.copy(source, digest, target, tag, on_line, stop)


# A build step's container killed (SIGKILL): out of memory, or the Engine stopping.
_KILLED = re.compile(r"returned a non-zero code: 137\b")


class _TransientPush(Exception):
    """A push error worth retrying (connection refused, 5xx, EOF)."""


def registry_host(repository: str) -> str:
    """The registry host of an image repository (Docker's rule: first part with . or :)."""
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _short(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc)
    return " ".join(text.split())[:300]
