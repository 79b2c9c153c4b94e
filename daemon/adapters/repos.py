"""The server's git repositories: one bare repository per deployment, with deployd's hook.

`git push astro main` lands here; the pre-receive hook from `hooks/` hands
the push to the daemon. The hook is (re)installed with this interpreter's
absolute path and `-S`, so it starts without site packages or version shims.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from daemon import names
from daemon.adapters import git

HOOK_SOURCE = Path(__file__).resolve().parents[2] / "hooks" / "pre-receive"
# One script, run by git under both names: the verdict, then a DAG deploy's `live` step.
HOOK_NAMES = ("pre-receive", "post-receive")
REPO_CONFIG = {
    "receive.advertisePushOptions": "true",
    "receive.denyDeletes": "true",
    "core.logAllRefUpdates": "true",
    "uploadpack.allowFilter": "true",
}


def repo_path(state_dir: Path, deployment: str) -> Path:
    """Where a deployment's bare repository lives."""
    return state_dir / "repos" / f"{names.deployment_name(deployment)}.git"


def hook_interpreter() -> str:
    """The real Python binary (not a venv or pyenv shim) for the hook's first line."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


def ensure(state_dir: Path, deployment: str, branch: str, refresh: bool = False) -> Path:
    """Create the deployment's repository if needed, name its branch HEAD, install the hook.

    An existing repository is left as it is unless `refresh` (the daemon's start and
    SIGHUP): this runs on every push and fetch, where five git processes would show.
    """
    path = repo_path(state_dir, deployment)
    hooks = path / "hooks"
    if (
        not refresh
        and (path / "HEAD").is_file()
        and all((hooks / name).is_file() for name in HOOK_NAMES)
    ):
        return path
    git.init_bare(path, REPO_CONFIG)
    git.set_head(path, f"refs/heads/{names.branch_name(branch)}")
    install_hook(path)
    return path


def install_hook(repo: Path) -> None:
    """Write the hooks into `repo` with this interpreter on their first line."""
    lines = HOOK_SOURCE.read_text(encoding="utf-8").splitlines(keepends=True)
    text = f"#!{hook_interpreter()} -S\n" + "".join(lines[1:])
    for name in HOOK_NAMES:
        target = repo / "hooks" / name
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        tmp.replace(target)


def record_deployed(
    state_dir: Path, deployment: str, branch: str, source: Path, commit: str
) -> None:
    """Make the server repository's branch name a commit deployed from elsewhere (the CLI)."""
    repo = ensure(state_dir, deployment, branch)
    if git.resolve(repo, commit) is None:
        git.fetch_commit(repo, source, commit)
    git.update_ref(repo, f"refs/heads/{names.branch_name(branch)}", commit)
