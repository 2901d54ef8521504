"""Run a program on a pseudo-terminal and expect its output (stdlib only).

    with PtyProcess([sys.executable, "-m", "qgaproxy", "shell", ...]) as p:
        p.expect(r"qga> ")
        p.send("guest-ping\\r")
        p.expect(r'\\{"return":\\{\\}\\}')

Every wait is bounded; a failed expect names the pattern and shows what
was read. Matching is done on the output with terminal escape sequences
and carriage returns removed.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time

STEP = 10.0

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def clean(data: bytes) -> str:
    return _ESCAPES.sub(b"", data).decode("utf-8", "replace")


class PtyProcess:
    """A child whose stdin and stdout (and stderr, unless given) are a pty."""

    def __init__(self, argv: list[str], *, env: dict | None = None, stderr=None, stdout=None):
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave if stdout is None else stdout,
            stderr=slave if stderr is None else stderr,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""  # everything read
        self.pos = 0  # where the next expect starts (in the cleaned text)
        self.eof = False

    def _read(self, deadline: float) -> bool:
        """Read what is there; False at EOF or the deadline."""
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return False
        ready, _, _ = select.select([self.master], [], [], left)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every slave fd closed
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.raw += chunk
        return True

    @property
    def text(self) -> str:
        return clean(self.raw)

    def expect(self, pattern: str, timeout: float = STEP) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if not self._read(deadline):
                if self.eof or time.monotonic() >= deadline:
                    raise AssertionError(
                        "no %r within %gs (eof %s); after position %d the output was:\n%s"
                        % (pattern, timeout, self.eof, self.pos, self.text[self.pos :][-3000:])
                    )

    def send(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def read_to_eof(self, timeout: float = STEP) -> str:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._read(deadline) and not self.eof:
                raise AssertionError("no EOF within %gs; output:\n%s" % (timeout, self.text[-3000:]))
        return self.text

    def wait(self, timeout: float = STEP) -> int:
        try:
            self.read_to_eof(timeout)
        except AssertionError:
            pass
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STEP)
        os.close(self.master)

    def __enter__(self) -> "PtyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
