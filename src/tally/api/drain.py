"""Graceful drain: what a `tally serve` process does between SIGTERM and its exit.

uvicorn, on SIGTERM, closes its listener at once, waits for open connections, then re-raises
the signal so that the process dies of it (exit status -15) however cleanly it shut down;
its worker supervisor waits for its workers without a bound and exits 0 whatever they did.
`DrainingServer` and `Workers` replace that with:

1. At the signal the server is *draining* (`DrainState.draining`): every request that
   starts from then on, `/readyz` included, on a new or a kept-alive connection, is
   answered by the protocol (api/server.py) with 503, `Retry-After` and `Connection:
   close`. Requests already running are not touched.
2. The listener stays open until the requests running are answered (their group commits
   done) and at least `notice_seconds` have passed since the signal, so that a balancer
   that only watches `/readyz` sees the server leave. Then it closes, idle connections are
   closed, and the application shuts down (committing what is still in flight, closing
   the store).
3. The exit status is 0 when all of it took less than `drain_seconds` from the signal.
   Otherwise what was still running is cancelled, `drain_timed_out` is logged (an error),
   and the status is 1. With `--workers N` each worker drains so, and the supervisor exits
   0 only when every worker did (a worker it has to kill counts as failed).

A second SIGINT (Ctrl+C) stops at once, without waiting, and exits 1.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import structlog
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = structlog.get_logger("tally.drain")

_POLL_SECONDS = 0.05
# How long past its own drain a worker may take (interpreter exit, closing the store) before
# the supervisor kills it.
_WORKER_EXIT_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class DrainTimes:
    drain_seconds: float
    notice_seconds: float = 0.0


class DrainState(ServerState):
    """uvicorn's state shared by a server's connections, and whether it is draining."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM or SIGINT as the module describes.

    After `run`, `started` says whether it served at all and `clean` whether it drained
    within its time (False after a timeout or a forced stop).
    """

    def __init__(self, config: uvicorn.Config, times: DrainTimes) -> None:
        super().__init__(config)
        self.server_state: DrainState = DrainState()
        self.times = times
        self.clean = True
        self._signalled_at: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only notes the time (on_tick, in the loop, does the rest).
        # uvicorn's also records the signal to re-raise it after shutdown; this one does not,
        # so a server that drained exits with its own status.
        del frame
        if self._signalled_at is None:
            self._signalled_at = time.monotonic()
            self.server_state.draining = True
        elif sig == signal.SIGINT:
            self.force_exit = True

    @property
    def _deadline(self) -> float:
        assert self._signalled_at is not None  # noqa: S101 - read only once draining
        return self._signalled_at + self.times.drain_seconds

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self._signalled_at is None or self.force_exit:
            return should_exit or self.force_exit
        if not self._announced:
            self._announced = True
            log.info(
                "drain_started",
                in_flight=len(self.server_state.tasks),
                drain_seconds=self.times.drain_seconds,
            )
        now = time.monotonic()
        if self.server_state.tasks and now < self._deadline:
            return False
        return now >= self._signalled_at + self.times.notice_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Whatever stopped it (a signal, uvicorn's request limit), nothing new starts now and
        # the drain's bound runs from the first of them.
        self.server_state.draining = True
        if self._signalled_at is None:
            self._signalled_at = time.monotonic()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # closes idle ones; the others close after their answer
        tasks = self.server_state.tasks
        if not await self._wait(lambda: not tasks):
            self.clean = False
            log.error(
                "drain_timed_out",
                cancelled_requests=len(tasks),
                drain_seconds=self.times.drain_seconds,
                detail="requests still running were cancelled; a client retrying gets each "
                "event stored once",
            )
            for task in list(tasks):
                task.cancel()
        if self.force_exit:
            self.clean = False
            log.error("drain_forced", detail="stopped at once by a second SIGINT")
            return
        # What is left: connections lingering after a refusal, or answers a client is still
        # reading. Bounded by the deadline, then dropped.
        connections = self.server_state.connections
        if not await self._wait(lambda: not connections):
            for connection in list(connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
        await self.lifespan.shutdown()
        log.info("drain_complete", clean=self.clean)

    async def _wait(self, done: Callable[[], bool]) -> bool:
        """Polls `done` until it is true (True) or the deadline or a forced stop (False)."""
        while not done():
            if self.force_exit or time.monotonic() >= self._deadline:
                return False
            await asyncio.sleep(_POLL_SECONDS)
        return True

    def exit_status(self) -> int:
        """The process's exit status after `run`: 0 for a clean drain."""
        if not self.started:
            return STARTUP_FAILURE
        return 0 if self.clean else 1


class WorkerProcess(Process):
    """A `--workers` process whose server drains (uvicorn's runs its own `Server`)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], times: DrainTimes):
        self.times = times  # before Process.__init__ hands this object to the child
        super().__init__(config, sockets)

    @property
    def server(self) -> DrainingServer:
        if self._server is None:
            self._server = DrainingServer(self.config, self.times)
        assert isinstance(self._server, DrainingServer)  # noqa: S101 - only ever set here
        return self._server

    def always_pong(self) -> None:
        # The supervisor closes its end of the pipe when it stops this worker: that ends the
        # health checks, and should not print a traceback.
        try:
            super().always_pong()
        except (EOFError, OSError):
            return

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        super().target(sockets)  # runs in the child process
        sys.exit(self.server.exit_status())


class Workers(Multiprocess):
    """uvicorn's supervisor of `--workers N`, its workers `WorkerProcess`es, and an exit
    status: `exit_status` after `run` is 0 only when every worker drained cleanly.

    The methods that start workers are uvicorn 0.54's, with the worker's class changed.
    """

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], times: DrainTimes
    ) -> None:
        super().__init__(config, sockets)
        self.times = times
        self._failed: list[tuple[int | None, int | None]] = []

    def _worker(self) -> WorkerProcess:
        return WorkerProcess(self.config, self.sockets, self.times)

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = self._worker()
            process.start()
            self.processes.append(process)

    def restart_all(self) -> None:
        for idx, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self._worker()
            new_process.start()
            timeout = self.config.timeout_worker_healthcheck
            if not new_process.wait_until_ready(timeout, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    log.error(
                        "worker_restart_aborted",
                        new_worker=new_process.pid,
                        kept_worker=old_process.pid,
                    )
                return
            old_process.terminate()
            old_process.join()
            self.processes[idx] = new_process

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker_failed_to_start", worker=process.pid)
                self._failed.append((process.pid, process.exitcode))
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker_died", worker=process.pid, exit_status=process.exitcode)
            replacement = self._worker()
            replacement.start()
            self.processes[idx] = replacement

    def handle_ttin(self) -> None:
        self.processes_num += 1
        process = self._worker()
        process.start()
        self.processes.append(process)

    def terminate_all(self) -> None:
        super().terminate_all()
        # The workers hold the listening socket too: once the last of them closes it the port
        # refuses connections. Held here as well, it would queue them until this process
        # exits, and each would then be reset with its request sent.
        for sock in self.sockets:
            sock.close()

    def join_all(self) -> None:
        # Each worker bounds its own drain; one that outlives it by far is killed.
        deadline = time.monotonic() + self.times.drain_seconds + _WORKER_EXIT_MARGIN_SECONDS
        for process in self.processes:
            process.process.join(max(deadline - time.monotonic(), 0))
            if process.process.is_alive():
                log.error("worker_killed", worker=process.pid, detail="it did not exit in time")
                process.kill()
                process.join()
            if process.exitcode != 0:
                self._failed.append((process.pid, process.exitcode))

    def exit_status(self) -> int:
        for pid, status in self._failed:
            log.error("worker_drain_failed", worker=pid, exit_status=status)
        return 1 if self._failed else 0
