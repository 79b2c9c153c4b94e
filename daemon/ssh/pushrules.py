"""What a push and an SSH command mean: pure decisions, no I/O.

A push's ref updates and push options become one deploy or one refusal; an
SSH command line becomes one known command or one refusal. Everything here is
input from outside, so every refusal is a full sentence saying what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon import names
from daemon.core import access
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
    """Push options (`git push -o ...`): force, pytest, image, description=TEXT,
    override-freeze."""
    force = pytest = override = image = False
    description = ""
    for option in raw:
        if option == "force":
            force = True
        elif option == "pytest":
            pytest = True
        elif option == "override-freeze":
            override = True
        elif option == "image":
            image = True
        elif option.startswith("description="):
            description = option.partition("=")[2].strip()
            if len(description) > MAX_DESCRIPTION or not description.isprintable():
                raise Refused(
                    f"the description must be one line of printable text, at most "
                    f"{MAX_DESCRIPTION} characters."
                )
        else:
            raise Refused(
                f"unknown push option {option[:40]!r}: use -o force, -o pytest, -o image, "
                "-o description=TEXT or -o override-freeze."
            )
    return Options(
        force=force,
        pytest=pytest,
        description=description,
        override_freeze=override,
        image=image,
    )


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


def _flags(
    args: tuple[str, ...], switches: tuple[str, ...], *, until: bool
) -> tuple[list[str], bool, str | None, str | None]:
    """Split command words: (the others, a switch was given, --reason's text, --until's TIME).

    `--reason` takes the rest of the line but a later `--until TIME` (ssh joins its
    arguments with spaces, so a reason needs no quotes); quotes around it are dropped.
    """
    rest: list[str] = []
    switched = False
    reason: list[str] | None = None
    when: str | None = None
    words = list(args)
    while words:
        word = words.pop(0)
        if word in switches:
            switched = True
        elif until and word == "--until":
            if not words:
                raise Refused("--until needs a TIME: 30m, 2h, 1d or an RFC 3339 time.")
            when = words.pop(0)
        elif word == "--reason":
            reason = []
        elif reason is not None:
            reason.append(word)
        else:
            rest.append(word)
    return rest, switched, None if reason is None else _unquoted(" ".join(reason)), when


def _unquoted(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@dataclass(frozen=True)
class Command:
    """An SSH command deployd knows."""

    name: str  # git-receive-pack, git-upload-pack, deploys, status, logs, help, rollback,
    # promote, freeze, unfreeze, cancel, login
    args: tuple[str, ...] = ()
    # rollback --freeze, freeze: the reason; freeze: --until TIME
    reason: str | None = None
    until: str | None = None

    @property
    def access(self) -> str:
        """The access (core/access.py) it needs on its deployment: READ for what only reads.

        A push, rollback, promotion (into its target), freeze, unfreeze and cancel
        change what runs; fetching, listing, status, logs, help and login do not.
        """
        return access.READ if self.name in _READING else access.DEPLOY


_READING = frozenset({"git-upload-pack", "deploys", "status", "logs", "help", "login"})


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
    if verb == "login" and not args:
        return Command("login")
    if verb == "deploys" and len(args) <= 1:
        for a in args:
            names.deployment_name(a)
        return Command("deploys", args)
    if verb == "status" and len(args) == 1:
        names.deployment_name(args[0])
        return Command("status", args)
    if verb == "logs" and len(args) == 1:
        return Command("logs", (str(names.deploy_id(args[0])),))
    if verb == "rollback" and args:
        positional, freeze, reason, _ = _flags(args, ("--freeze",), until=False)
        if 1 <= len(positional) <= 2 and (freeze or reason is None):
            names.deployment_name(positional[0])
            rest = (str(names.deploy_id(positional[1])),) if len(positional) == 2 else ()
            return Command(
                "rollback", (positional[0], *rest), reason=(reason or "") if freeze else None
            )
        raise Refused("usage: rollback DEPLOYMENT [DEPLOY_ID] [--freeze [--reason TEXT]]")
    if verb == "promote" and 2 <= len(args) <= 3:
        for a in args[:2]:
            names.deployment_name(a)
        rest = (str(names.deploy_id(args[2])),) if len(args) == 3 else ()
        return Command("promote", (args[0], args[1], *rest))
    if verb == "freeze" and args:
        names.deployment_name(args[0])
        words, _, reason, until = _flags(args[1:], (), until=True)
        text = _unquoted(" ".join([*words, *([reason] if reason else [])]))
        return Command("freeze", (args[0],), reason=text, until=until)
    if verb == "unfreeze" and len(args) == 1:
        names.deployment_name(args[0])
        return Command("unfreeze", args)
    if verb == "cancel" and len(args) == 1:
        return Command("cancel", (str(names.deploy_id(args[0])),))
    raise Refused(f"unknown command {verb[:40]!r}; see: ssh git@HOST help")
