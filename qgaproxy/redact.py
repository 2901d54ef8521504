"""What of a request may be written down: secrets never reach a log.

Passwords (guest-set-user-password), file data (guest-file-write), a
process's input and environment (guest-exec), SSH keys being installed:
their values are replaced by a marker that says how big they were, so a
trace still shows that they were there. Used by debug traces and the
audit trail. No I/O.
"""

from __future__ import annotations

from typing import Any

# command -> argument members whose values are secret
SECRET_ARGUMENTS = {
    "guest-set-user-password": ("password",),
    "guest-file-write": ("buf-b64",),
    "guest-exec": ("input-data", "env"),
    "guest-ssh-add-authorized-keys": ("keys",),
    "guest-ssh-remove-authorized-keys": ("keys",),
}
# In replies: what a guest returns can be secret too (file contents, output).
SECRET_RESULTS = {
    "guest-file-read": ("buf-b64",),
    "guest-exec-status": ("out-data", "err-data"),
    "guest-ssh-get-authorized-keys": ("keys",),
}


def _marker(value: Any) -> str:
    if isinstance(value, str):
        return "<redacted %d chars>" % len(value)
    if isinstance(value, list):
        return "<redacted %d items>" % len(value)
    return "<redacted>"


def arguments(command: str, args: Any) -> Any:
    """The arguments with secret members replaced."""
    secret = SECRET_ARGUMENTS.get(command)
    if not secret or not isinstance(args, dict):
        return args
    return {key: (_marker(value) if key in secret else value) for key, value in args.items()}


def result(command: str, value: Any) -> Any:
    secret = SECRET_RESULTS.get(command)
    if not secret or not isinstance(value, dict):
        return value
    return {key: (_marker(v) if key in secret else v) for key, v in value.items()}


def request(value: Any) -> Any:
    """A whole decoded request (as a client sent it), redacted."""
    if not isinstance(value, dict) or not isinstance(value.get("execute"), str):
        return value
    if "arguments" not in value:
        return value
    out = dict(value)
    out["arguments"] = arguments(value["execute"], value["arguments"])
    return out


def reply(command: str, value: dict) -> dict:
    """A decoded reply, redacted: secret results, and the error text of a
    command with secret arguments (the agent quotes them back: an invalid
    SSH key, a password it refuses)."""
    shown = dict(value)
    if "return" in shown:
        shown["return"] = result(command, shown["return"])
    error = shown.get("error")
    if command in SECRET_ARGUMENTS and isinstance(error, dict) and "desc" in error:
        shown["error"] = dict(error, desc=_marker(error["desc"]))
    return shown
