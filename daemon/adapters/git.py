"""Adapter to git: read a repository's HEAD, its cleanliness, and export a commit.

Every call is an argument list (never a shell) with its exit status checked;
failures become GitError with git's own message.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon import names
from daemon.errors import DirtyWorkTree, DiskFull, GitError, UsageError

NO_SPACE = "No space left on device"

_ENV_SAFE = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


@dataclass(frozen=True)
class Head:
    """The commit a repository's HEAD names, with its tree and subject."""

    commit: str
    tree: str
    ref: str
    subject: str


def _git(
    repo: Path,
    *args: str,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=False,
            env={**_minimal_env(), **(env or {}), **_ENV_SAFE},
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git {args[0]} could not run: {exc}.") from exc
    if check and proc.returncode != 0:
        if NO_SPACE in proc.stderr:
            raise DiskFull(repo, f", in git {args[0]}")
        msg = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise GitError(f"git {args[0]} failed in {repo}: {msg}")
    return proc.stdout


def _minimal_env() -> dict[str, str]:
    keep = ("PATH", "HOME")
    return {k: v for k, v in os.environ.items() if k in keep}


def head(repo: Path) -> Head:
    """Read HEAD of the repository at `repo` (a work tree)."""
    if not repo.is_dir():
        raise UsageError(f"{repo} is not a directory.")
    if _git(repo, "rev-parse", "--is-inside-work-tree", check=False).strip() != "true":
        raise UsageError(f"{repo} is not a git work tree; run deployd deploy inside one.")
    out = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).strip()
    if not out:
        raise UsageError(f"{repo} has no commits yet; commit the project first.")
    commit = names.commit_sha(out)
    tree = _git(repo, "rev-parse", f"{commit}^{{tree}}").strip()
    ref = _git(repo, "symbolic-ref", "--quiet", "HEAD", check=False).strip() or "HEAD"
    subject = _git(repo, "log", "-1", "--format=%s", commit).strip()
    return Head(commit, tree, ref, subject)


def ensure_clean(repo: Path) -> None:
    """Raise DirtyWorkTree if the work tree has changes or untracked files."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=normal")
    changed = [line[3:] for line in out.splitlines() if line.strip()]
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        raise DirtyWorkTree(
            f"the work tree of {repo} has uncommitted changes ({shown}); commit or stash "
            "them, or pass --allow-dirty to deploy the HEAD commit without them."
        )


def export(
    repo: Path, commit: str, dest: Path, object_env: Mapping[str, str] | None = None
) -> None:
    """Write the files of `commit` (no .git) into the empty directory `dest`.

    `object_env` carries git's quarantine variables when the commit is still
    in a push that a pre-receive hook is judging.
    """
    names.commit_sha(commit)
    dest.mkdir(parents=True, exist_ok=True)
    env = {**_minimal_env(), **(object_env or {}), **_ENV_SAFE}
    try:
        archive = subprocess.Popen(
            ["git", "-C", str(repo), "archive", "--format=tar", commit],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        untar = subprocess.run(
            ["tar", "-x", "--no-same-owner", "-C", str(dest)],
            stdin=archive.stdout,
            capture_output=True,
            check=False,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"could not export commit {commit[:12]}: {exc}.") from exc
    assert archive.stdout is not None and archive.stderr is not None
    archive.stdout.close()
    err = archive.stderr.read().decode(errors="replace").strip()
    archive.stderr.close()
    unpacked = untar.stderr.decode(errors="replace")
    # tar reports a write cut short by a full disk as "Wrote only N of M bytes".
    failed = archive.wait() != 0 or untar.returncode != 0
    if failed and (NO_SPACE in err + unpacked or shutil.disk_usage(dest).free < 1 << 20):
        raise DiskFull(dest, f", writing the files of {commit[:12]}")
    if archive.returncode != 0:
        raise GitError(f"git archive of {commit[:12]} failed: {err or 'no message'}")
    if untar.returncode != 0:
        raise GitError(
            f"unpacking commit {commit[:12]} failed: "
            f"{untar.stderr.decode(errors='replace').strip()}"
        )


QUARANTINE_VARS = (
    "GIT_QUARANTINE_PATH",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
)
ZERO = "0" * 40


def init_bare(path: Path, config: Mapping[str, str]) -> None:
    """Create a bare repository at `path` (if missing) and set `config` on it."""
    if not (path / "HEAD").is_file():
        path.mkdir(parents=True, exist_ok=True)
        _git(path, "init", "--quiet", "--bare")
    for key, value in config.items():
        _git(path, "config", key, value)


def set_head(repo: Path, ref: str) -> None:
    """Make HEAD of a bare repository name `ref` (what a clone checks out)."""
    _git(repo, "symbolic-ref", "HEAD", ref)


def resolve(repo: Path, ref: str) -> str | None:
    """The commit `ref` names in `repo`, or None if it does not exist."""
    out = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return out.strip() or None


def fetch_commit(repo: Path, source: Path, commit: str) -> None:
    """Copy `commit` and its history from the repository at `source` into `repo`."""
    names.commit_sha(commit)
    _git(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", str(source), commit)


FETCH_TIMEOUT = 1800
# A constant command: the key and known-hosts paths reach ssh as environment
# variables, never spliced into the string git hands to the shell.
_FETCH_SSH = (
    'ssh -i "$DEPLOYD_FETCH_KEY" -o IdentitiesOnly=yes -o BatchMode=yes '
    '-o UserKnownHostsFile="$DEPLOYD_KNOWN_HOSTS" -o StrictHostKeyChecking=accept-new '
    "-o ConnectTimeout=20"
)


# github.com's published SSH host key (docs.github.com, "GitHub's SSH key fingerprints"):
# pinned, so that the first fetch from GitHub is not trust-on-first-use. Other
# hosts are learned on first use unless their keys are put in the file beforehand.
GITHUB_HOST_KEY = (
    "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
)


def seed_known_hosts(path: Path) -> None:
    """Make sure deployd's known_hosts file pins github.com's host key."""
    text = path.read_text() if path.exists() else ""
    if GITHUB_HOST_KEY not in text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(("" if not text or text.endswith("\n") else "\n") + GITHUB_HOST_KEY + "\n")


def fetch_env(*, key_file: Path | None, token: str | None, known_hosts: Path) -> dict[str, str]:
    """The environment for fetching from a deployment's `fetch_url`.

    Only file, ssh and https transports (`ext::` and friends are refused by git);
    an SSH deploy key is used alone; an HTTPS token goes in a header set through
    GIT_CONFIG_* variables, so it never appears in a command line.
    """
    env = {"GIT_ALLOW_PROTOCOL": "file:ssh:https", "GIT_SSH_VARIANT": "ssh"}
    if key_file is not None:
        env |= {
            "GIT_SSH_COMMAND": _FETCH_SSH,
            "DEPLOYD_FETCH_KEY": str(key_file),
            "DEPLOYD_KNOWN_HOSTS": str(known_hosts),
        }
    if token is not None:
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        env |= {
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            "GIT_CONFIG_KEY_1": "credential.helper",
            "GIT_CONFIG_VALUE_1": "",
        }
    return env


def fetch_remote(repo: Path, url: str, commit: str, env: Mapping[str, str]) -> bool:
    """Fetch `commit` from the configured `url` into `repo`; False if it was already there."""
    names.commit_sha(commit)
    if resolve(repo, commit) is not None:
        return False
    try:
        # A first fetch brings the whole history: generous, but not unbounded.
        _git(
            repo,
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            url,
            commit,
            env=env,
            timeout=FETCH_TIMEOUT,
        )
    except GitError as exc:
        raise GitError(
            f"could not fetch commit {commit[:12]} from the deployment's fetch_url: "
            f"{exc.message.split(': ', 1)[-1]}"
        ) from exc
    if resolve(repo, commit) is None:
        raise GitError(f"fetch_url does not have commit {commit[:12]}.")
    return True


def remote_tip(repo: Path, url: str, branch: str, env: Mapping[str, str]) -> str | None:
    """The commit `branch` names at the configured `url` now (None: no such branch)."""
    ref = f"refs/heads/{names.branch_name(branch)}"
    try:
        out = _git(repo, "ls-remote", "--quiet", url, ref, env=env, timeout=FETCH_TIMEOUT)
    except GitError as exc:
        raise GitError(
            f"could not read {ref} at the deployment's fetch_url: {exc.message.split(': ', 1)[-1]}"
        ) from exc
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if name == ref:
            return names.commit_sha(sha)
    return None


def ancestry(repo: Path, older: str, newer: str) -> bool | None:
    """Whether `older` is `newer` or in its history; None if `repo` lacks either commit.

    A commit the repository does not hold (a webhook's new push, not fetched yet: the
    common case) is answered without starting git.
    """
    names.commit_sha(older)
    names.commit_sha(newer)
    if stored(repo, older) is False or stored(repo, newer) is False:
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), "merge-base", "--is-ancestor", older, newer],
            capture_output=True,
            check=False,
            env={**_minimal_env(), **_ENV_SAFE},
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git merge-base could not run: {exc}.") from exc
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    return None  # 128: a commit (or the repository) is not there


_PACK_INDEX_V2 = b"\377tOc\0\0\0\2"


def stored(repo: Path, sha: str) -> bool | None:
    """Whether `repo` holds object `sha`, read off its object store (no git process):
    a loose object, or an entry of a pack index (format version 2, gitformat-pack(5)).

    None when this cannot tell (alternates, another index version, unreadable files):
    ask git.
    """
    names.commit_sha(sha)
    objects = repo / "objects" if (repo / "objects").is_dir() else repo / ".git" / "objects"
    if not objects.is_dir() or (objects / "info" / "alternates").exists():
        return None
    if (objects / sha[:2] / sha[2:]).exists():
        return True
    want = bytes.fromhex(sha)
    try:
        indexes = [e.path for e in os.scandir(objects / "pack") if e.name.endswith(".idx")]
    except FileNotFoundError:
        indexes = []
    except OSError:
        return None
    for index in indexes:
        try:
            with open(index, "rb") as fh:
                if fh.read(8) != _PACK_INDEX_V2:
                    return None
                # The fan-out table: how many names start with a byte <= each value.
                fanout = fh.read(1024)
                first = want[0]
                lo = int.from_bytes(fanout[(first - 1) * 4 : first * 4]) if first else 0
                hi = int.from_bytes(fanout[first * 4 : first * 4 + 4])
                while lo < hi:  # the sorted names of that first byte
                    mid = (lo + hi) // 2
                    fh.seek(8 + 1024 + mid * 20)
                    name = fh.read(20)
                    if name == want:
                        return True
                    lo, hi = (mid + 1, hi) if name < want else (lo, mid)
        except FileNotFoundError:  # repacked meanwhile: its objects are in another pack
            return None
        except OSError:
            return None
    return False


def changed_paths(
    repo: Path, old: str, new: str, object_env: Mapping[str, str] | None = None
) -> list[str]:
    """Every path whose content differs between commits `old` and `new`, sorted.

    A tree-to-tree diff: it covers all the commits in between (and works when `new`
    does not descend from `old`, after a rollback or a force-push), since what
    matters is what runs against what will. Renames are off, so a file moved into or
    out of `dags/` counts at both its names. Plumbing (`diff-tree`) so that no user
    diff config applies; NUL-separated, and decoded as the file system does, so names
    with newlines, quotes or bytes that are not UTF-8 come through unmangled.
    """
    names.commit_sha(old)
    names.commit_sha(new)
    args = ["diff-tree", "-r", "-z", "--name-only", "--no-renames", "--no-ext-diff"]
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args, old, new, "--"],
            capture_output=True,
            check=False,
            env={**_minimal_env(), **(object_env or {}), **_ENV_SAFE},
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git diff-tree could not run: {exc}.") from exc
    if proc.returncode != 0:
        err = os.fsdecode(proc.stderr).strip().splitlines() or ["(no message)"]
        raise GitError(f"git diff-tree failed in {repo}: {err[-1]}")
    return sorted(os.fsdecode(p) for p in proc.stdout.split(b"\0") if p)


def update_ref(repo: Path, ref: str, commit: str) -> None:
    """Point `ref` at `commit`."""
    names.commit_sha(commit)
    _git(repo, "update-ref", "-m", "deployd: deployed", ref, commit)


def tree(repo: Path, commit: str, object_env: Mapping[str, str] | None = None) -> str:
    """The id of `commit`'s tree (what the deploy ships, whatever the history)."""
    names.commit_sha(commit)
    return _git(repo, "rev-parse", f"{commit}^{{tree}}", env=object_env).strip()


def subject(repo: Path, commit: str, object_env: Mapping[str, str] | None = None) -> str:
    """The subject line of `commit`."""
    names.commit_sha(commit)
    return _git(repo, "log", "-1", "--format=%s", commit, env=object_env).strip()
