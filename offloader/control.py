"""The agent's control socket: how `status` and `flush` reach a running agent.

An abstract UNIX socket belongs to the network namespace it is bound in, so
each namespace's agent has its own, whether commands run under
``ip netns exec`` (which remounts /sys) or ``nsenter --net`` (which does
not), and agents in different namespaces never collide. Protocol: one JSON
request line, one JSON answer line.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from .errors import AgentNotRunning, OffloadError

ADDRESS = "\0ebpf-offloader/control"
MAX_REQUEST = 4096

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    def __init__(self, handler: Handler, address: str = ADDRESS,
                 fork_for: set[str] | None = None) -> None:
        self.handler = handler
        self.fork_for = fork_for
        self.children: set[int] = set()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(address)
        except OSError as exc:
            self.sock.close()
            raise OffloadError("another agent already runs in this network namespace") from exc
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        """Answer one waiting client (called when the socket is readable).

        Read-only requests (``fork_for``, i.e. ``status``) are answered by a
        forked child: a report on 100,000 flows builds tens of megabytes of
        Python objects, which would otherwise stay in the agent's heap."""
        self.reap()
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                request = self._read(conn)
            except (OSError, ValueError) as exc:
                self._send(conn, {"error": str(exc)})
                return
            if self.fork_for and request.get("cmd") in self.fork_for:
                try:
                    pid = os.fork()
                except OSError:
                    pid = -1
                if pid == 0:  # the child answers and leaves without cleanup
                    code = 1
                    try:
                        self._send(conn, self._handle(request))
                        code = 0
                    finally:
                        os._exit(code)
                if pid > 0:
                    self.children.add(pid)
                    return
            self._send(conn, self._handle(request))

    def _read(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        request = json.loads(data or b"{}")
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object")
        return request

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.handler(request)
        except (ValueError, OffloadError) as exc:
            return {"error": str(exc)}

    @staticmethod
    def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass

    def reap(self) -> None:
        """Collect finished status children."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.sock.close()


def request(cmd: str, timeout: float = 10.0, address: str = ADDRESS, **args: Any) -> dict[str, Any]:
    """Send one command to the agent of this network namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise AgentNotRunning("no ebpf-offloader agent is running in this network namespace") from exc
    with sock:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise OffloadError("malformed answer from the agent")
    if "error" in answer:
        raise OffloadError(f"agent: {answer['error']}")
    return answer
