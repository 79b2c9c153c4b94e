"""What a push and an SSH command mean: pure decisions, no I/O.

A push's ref updates and push options become one deploy or one refusal; an
SSH command line becomes one known command or one refusal. Everything here is
input from outside, so every refusal is a full sentence saying what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon import names
from daemon.core.deploys import Options
from daemon.errors import DeploydError

ZERO = "0" * 40
MAX_COMMAND = 4096
MAX_DESCRIPTION = 500
_GIT_COMMAND = re.compile(r"(git-receive-pack|git-upload-pack) +(?:'([^']*)'|([^'\s]+))")


class Refused(DeploydError):
    """A push or a command that deployd will not carry out."""


@dataclass(frozen=True)
class RefUpdate:
    """One line of pre-receive input: old and new commit of a ref."""

    old: str
    new: str
    ref: str


@dataclass(frozen=True)
class PushPlan:
    """The deploy a push asks for."""

    commit: str
    old: str
    ref: str
    options: Options


def parse_updates(lines: list[list[str]]) -> list[RefUpdate]:
    """Validate the hook's ref updates ([old, new, ref] each)."""
    updates = []
    for item in lines:
        if not isinstance(item, list) or len(item) != 3:
            raise Refused("the hook sent a malformed ref update.")
        old, new, ref = (str(x) for x in item)
        for sha in (old, new):
            names.commit_sha(sha)
        if not ref.startswith("refs/") or len(ref) > 255:
            raise Refused(f"{ref!r} is not a ref.")
        updates.append(RefUpdate(old, new, ref))
    return updates


def parse_options(raw: list[str]) -> Options:
    """Push options (`git push -o ...`): force, pytest, description=TEXT."""
    force = pytest = False
    description = ""
    for option in raw:
        if option == "force":
            force = True
        elif option == "pytest":
            pytest = True
        elif option.startswith("description="):
            description = option.partition("=")[2].strip()
            if len(description) > MAX_DESCRIPTION or not description.isprintable():
                raise Refused(
                    f"the description must be one line of printable text, at most "
                    f"{MAX_DESCRIPTION} characters."
                )
        else:
            raise Refused(
                f"unknown push option {option[:40]!r}: use -o force, -o pytest or "
                "-o description=TEXT."
            )
    return Options(force=force, pytest=pytest, description=description)


def decide(updates: list[RefUpdate], branch: str, raw_options: list[str]) -> PushPlan:
    """Turn a push into the deploy it asks for, or refuse it with what to push instead."""
    want = f"refs/heads/{branch}"
    if len(updates) != 1:
        raise Refused(f"push one branch at a time: git push astro {branch}")
    update = updates[0]
    if update.ref.startswith("refs/tags/"):
        raise Refused(f"tags are not deployed; push the branch instead: git push astro {branch}")
    if update.ref != want:
        pushed = update.ref.removeprefix("refs/heads/")
        raise Refused(
            f"this deployment deploys branch {branch}, not {pushed}; "
            f"to deploy {pushed}: git push astro {pushed}:{branch}"
        )
    if update.new == ZERO:
        raise Refused(f"deleting {branch} is not allowed: it names what was deployed.")
    return PushPlan(update.new, update.old, update.ref, parse_options(raw_options))


@dataclass(frozen=True)
class Command:
    """An SSH command deployd knows."""

    name: str  # git-receive-pack, git-upload-pack, deploys, status, logs, help
    args: tuple[str, ...] = ()


def parse_command(line: str | None) -> Command:
    """Parse the command a client asked to run; refuse anything else."""
    if line is None or not line.strip():
        raise Refused("deployd offers no shell; see: ssh git@HOST help")
    if len(line) > MAX_COMMAND:
        raise Refused("that command is too long.")
    if any(c in line for c in "\0\r\n"):
        raise Refused("commands are one line of printable text.")
    m = _GIT_COMMAND.fullmatch(line.strip())
    if m:
        path = m.group(2) if m.group(2) is not None else m.group(3)
        name = path.removeprefix("/").removesuffix(".git")
        names.deployment_name(name)
        return Command(m.group(1), (name,))
    if line.startswith(("git-receive-pack", "git-upload-pack")):
        raise Refused("usage: git-receive-pack 'DEPLOYMENT' (git does this for you)")
    words = line.split()
    verb, args = words[0], tuple(words[1:])
    if verb == "help" and not args:
        return Command("help")
    if verb == "deploys" and len(args) <= 1:
        for a in args:
            names.deployment_name(a)
        return Command("deploys", args)
    if verb == "status" and len(args) == 1:
        names.deployment_name(args[0])
        return Command("status", args)
    if verb == "logs" and len(args) == 1:
        return Command("logs", (str(names.deploy_id(args[0])),))
    if verb == "rollback" and 1 <= len(args) <= 2:
        names.deployment_name(args[0])
        rest = (str(names.deploy_id(args[1])),) if len(args) == 2 else ()
        return Command("rollback", (args[0], *rest))
    raise Refused(f"unknown command {verb[:40]!r}; see: ssh git@HOST help")
