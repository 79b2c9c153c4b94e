"""The deploy states (SPEC.md) and which may follow which: plain names, no imports.

queued → running → succeeded | failed | rolled_back | cancelled | superseded | interrupted
"""

from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
CANCELLED = "cancelled"
SUPERSEDED = "superseded"
INTERRUPTED = "interrupted"

FINAL_STATES = frozenset({SUCCEEDED, FAILED, ROLLED_BACK, CANCELLED, SUPERSEDED, INTERRUPTED})
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, SUPERSEDED, INTERRUPTED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, ROLLED_BACK, CANCELLED, INTERRUPTED}),
}

# What the outbox calls a deploy reaching a state: "started" for running, else the state.
STARTED = "started"
EVENTS = (STARTED, SUCCEEDED, FAILED, ROLLED_BACK, CANCELLED, SUPERSEDED, INTERRUPTED)
