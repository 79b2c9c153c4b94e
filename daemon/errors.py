"""The exception tree: one base class, one subclass per failure area.

Each carries the exit code the CLI maps it to (SPEC.md: 0 ok, 1 deploy failed,
2 usage or config, 3 rolled back, 4 a dependency could not be reached), the
state a deploy it ends is recorded in, and the facts a person needs to act on
it. Messages are full sentences.
"""

from __future__ import annotations

from daemon.core import states

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ROLLED_BACK = 3
EXIT_UNREACHABLE = 4


class DeploydError(Exception):
    """Base of every error deployd raises on purpose."""

    exit_code = EXIT_FAILED
    final_state = states.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(DeploydError):
    """The configuration file is missing, malformed or names a bad value."""

    exit_code = EXIT_USAGE

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}" if key else f"config: {problem}")
        self.key = key
        self.problem = problem


class UsageError(DeploydError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class InvalidName(UsageError):
    """A name or ref from outside failed validation."""


class UnknownDeployment(UsageError):
    """No deployment of that name is configured."""


class Refusal(UsageError):
    """A rule refuses the action now: a freeze, a deployment that takes only promotions."""


class GitError(DeploydError):
    """A git command failed."""


class DirtyWorkTree(UsageError):
    """The repository to deploy has uncommitted changes."""


class BuildError(DeploydError):
    """The image build failed; carries the build output's tail."""

    def __init__(self, message: str, *, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


class CheckError(DeploydError):
    """The DAG checks or the tests found problems that block the deploy."""


class RegistryError(DeploydError):
    """The registry refused the image (authentication, permission, manifest)."""


class DependencyUnreachable(DeploydError):
    """Docker, the registry or the cluster could not be reached."""

    exit_code = EXIT_UNREACHABLE


class ClusterError(DeploydError):
    """The cluster refused what the deploy needs: a missing workload, RBAC, an API error."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # the API's Status reason (NotFound, Forbidden, ...)


class DiskFull(DeploydError):
    """The disk holding state_dir has no space left: for a checkout, a repository, the records."""

    def __init__(self, path: object, doing: str = "") -> None:
        super().__init__(
            f"the disk holding {path} is full (No space left on device{doing}): "
            "free space on it, then deploy again."
        )
        self.path = path


class Cancelled(DeploydError):
    """The deploy was cancelled (its requester went away or asked)."""

    final_state = states.CANCELLED


class RolledBack(DeploydError):
    """The rollout failed and the previous image was restored."""

    exit_code = EXIT_ROLLED_BACK
    final_state = states.ROLLED_BACK


class StepFailed(DeploydError):
    """A step of a deploy failed: which step, and the error that stopped it."""

    def __init__(self, step: str, cause: BaseException) -> None:
        internal = not isinstance(cause, DeploydError)
        message = f"internal error: {type(cause).__name__}: {cause}" if internal else str(cause)
        super().__init__(message)
        self.step = step
        self.cause = cause
        if isinstance(cause, DeploydError):
            self.exit_code = cause.exit_code
            self.final_state = cause.final_state
