"""The exceptions ebpf-offloader raises.

    OffloadError                 root: the CLI catches it, prints it, exits non-zero
    +-- ConfigError              a bad configuration file or value (file, line, option)
    +-- BpfError                 a libbpf or bpf() call failed (carries errno)
    |   +-- ObjectLoadError      the object failed to open or load (carries the verifier log)
    |   +-- AttachError          XDP or TC attach/detach failed
    |   +-- MapError             a map operation failed
    +-- ResolveError             no usable next hop for a flow
    +-- AgentNotRunning          status/flush found no agent in this network namespace
    +-- AgentNotAnswering        an agent holds the control address but does not answer
    +-- ControlRefused           the agent refused this user (not root, not in control_group)
    +-- ControlAddressHeld       a process other than a root agent holds the control address
"""

from __future__ import annotations

import os


class OffloadError(Exception):
    """Root of every error ebpf-offloader raises on purpose."""


class ConfigError(OffloadError):
    """A configuration file or value is wrong; says where."""

    def __init__(self, message: str, *, file: str = "", line: int = 0, option: str = "") -> None:
        self.file = file
        self.line = line
        self.option = option
        self.reason = message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        what = f"{option}: " if option else ""
        super().__init__(f"{where}{what}{message}")


class BpfError(OffloadError):
    """A bpf() or libbpf call failed."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        self.errno = abs(errno)
        detail = f" ({os.strerror(self.errno)}, errno {self.errno})" if self.errno else ""
        super().__init__(f"{message}{detail}")


class ObjectLoadError(BpfError):
    """The BPF object could not be opened or loaded; `log` holds the verifier log."""

    def __init__(self, message: str, *, errno: int = 0, log: str = "") -> None:
        self.log = log
        super().__init__(message, errno=errno)


class AttachError(BpfError):
    """A program could not be attached to or detached from a device."""


class MapError(BpfError):
    """A map lookup, update, delete or batch operation failed."""


class ResolveError(OffloadError):
    """No next hop could be resolved for a flow."""


class AgentNotRunning(OffloadError):
    """No agent answers in this network namespace."""


class AgentNotAnswering(OffloadError):
    """An agent holds the control address but does not answer (stopped, stuck)."""


class ControlRefused(OffloadError):
    """The agent answers only root (and its control group); this user is neither."""


class ControlAddressHeld(OffloadError):
    """The control address is held by a process that is not an agent running as root."""
