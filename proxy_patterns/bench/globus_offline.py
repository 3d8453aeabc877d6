"""Globus Compute without the cloud: the real SDK ``Executor`` talking to a local stand-in of the
web service, whose tasks run on a real ``globus-compute-endpoint`` engine.

It exists so that benchmarks, notebooks and tests run Globus Compute on one machine, with no
login and no internet. The cloud service is the only part of the path replaced:

- the SDK's HTTP calls (``POST /v3/functions``, ``POST /v3/endpoints/{id}/submit``) are answered
  by :class:`ComputeServiceStandIn` through the ``responses`` library (it patches ``requests``,
  so the SDK's own client builds and sends every request as usual, with no socket or port);
- the service's 10 MB limit on a submission is enforced as the service does, with HTTP 413 and
  ``TASK_PAYLOAD_TOO_LARGE``, which the SDK raises as ``globus_sdk.ComputeAPIError``;
- each task is handed to the engine as the endpoint hands it (a packed messagepack ``Task``),
  and the engine enforces the real 10 MiB result limit (``MaxResultSizeExceeded``);
- results go back through a per-task-group queue, as the service's AMQP queue holds them until
  the client listens, read by a subclass of the SDK's ``_ResultWatcher`` whose connection is that
  queue instead of AMQP: matching results to futures and raising ``TaskExecutionFailed`` stay the
  SDK's own code.

::

    with started(process_pool_engine(workers=2), run_dir) as engine:
        with offline_globus_compute(engine) as compute:
            compute.executor.submit(fn, x).result()     # the SDK's Executor, as with the cloud
            compute.service.submission_sizes            # bytes of each request it received

What runs locally is faster than the cloud path (no network, no queueing at the service): any
time measured here is a lower bound of the same work through the cloud. The pytest fixtures
are in ``tests/globus_helpers.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from proxy_patterns.extras import requires_extra

with requires_extra("bench", __name__):
    import globus_sdk
    import responses
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails, Task
    from globus_compute_endpoint.engines import GCFuture, GlobusComputeEngine, ProcessPoolEngine
    from globus_compute_endpoint.engines.base import GlobusComputeEngineBase
    from globus_compute_endpoint.engines.helper import _RESULT_SIZE_LIMIT
    from globus_compute_sdk import Client, Executor
    from globus_compute_sdk.sdk import executor as executor_module
    from globus_compute_sdk.serialize import ComputeSerializer
    from parsl.providers import LocalProvider
    from pika.spec import Basic, BasicProperties
    from requests import PreparedRequest

#: The service refuses a submission whose request body is larger (HTTP 413). Its documentation
#: says "10MB"; the decimal reading is the stricter one, so code that fits here fits there.
REQUEST_SIZE_LIMIT = 10_000_000
#: The endpoint refuses a result whose serialized form is larger (``MaxResultSizeExceeded``).
RESULT_SIZE_LIMIT: int = _RESULT_SIZE_LIMIT
#: How long teardown waits for a thread to stop before it reports a leak.
_STOP_TIMEOUT_S = 30.0

_HandlerReply = tuple[int, dict[str, str], str]


def _error_reply(status: int, code: str, message: str) -> _HandlerReply:
    """An error in the service's shape, which ``globus_sdk`` parses into ``.code``/``.message``."""
    document = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
    return status, {}, json.dumps(document)


def _body_of(request: PreparedRequest) -> bytes:
    """The request body as sent: ``globus_sdk`` sends JSON documents, never a stream."""
    body = request.body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes):
        return body
    raise TypeError(f"the stand-in service reads whole JSON bodies, not {type(body).__name__}")


class ComputeServiceStandIn:
    """The web service's part for one endpoint, whose tasks run on ``engine``.

    It records the size of every submission it received in ``submission_sizes`` and of every
    result it sent back in ``result_sizes`` (bytes), so a caller can check what went through the
    service.
    """

    def __init__(self, engine: GlobusComputeEngineBase, endpoint_id: uuid.UUID) -> None:
        self.engine = engine
        self.endpoint_id = endpoint_id
        self.submission_sizes: list[int] = []
        self.result_sizes: list[int] = []
        self._functions: dict[str, str] = {}  # function id -> packed function code
        self._result_queues: dict[uuid.UUID, queue.Queue[bytes]] = {}
        self._lock = threading.Lock()

    def install(self, http: responses.RequestsMock, base_url: str) -> None:
        """Answer the SDK's calls to the service at ``base_url`` (the ``Client``'s address)."""
        http.add_callback(
            responses.POST,
            f"{base_url}/v3/functions",
            callback=self._register_function,
            content_type="application/json",
        )
        http.add_callback(
            responses.POST,
            f"{base_url}/v3/endpoints/{self.endpoint_id}/submit",
            callback=self._submit,
            content_type="application/json",
        )

    def result_queue(self, task_group_id: uuid.UUID) -> queue.Queue[bytes]:
        """The task group's result queue, which (like AMQP's) exists before anyone listens."""
        with self._lock:
            return self._result_queues.setdefault(task_group_id, queue.Queue())

    def _register_function(self, request: PreparedRequest) -> _HandlerReply:
        document = json.loads(_body_of(request))
        function_id = str(uuid.uuid4())
        with self._lock:
            self._functions[function_id] = document["function_code"]
        return 200, {}, json.dumps({"function_uuid": function_id})

    def _submit(self, request: PreparedRequest) -> _HandlerReply:
        body = _body_of(request)
        with self._lock:
            self.submission_sizes.append(len(body))
        if len(body) > REQUEST_SIZE_LIMIT:
            return _error_reply(
                413,
                "TASK_PAYLOAD_TOO_LARGE",
                f"Task payload of {len(body)} bytes exceeds the {REQUEST_SIZE_LIMIT}-byte limit",
            )
        document = json.loads(body)
        with self._lock:
            unknown = [f for f in document["tasks"] if f not in self._functions]
            codes = {f: self._functions.get(f, "") for f in document["tasks"]}
        if unknown:
            return _error_reply(404, "FUNCTION_NOT_FOUND", f"Functions not found: {unknown}")

        group = document.get("task_group_id")
        task_group_id = uuid.UUID(group) if group else uuid.uuid4()
        results = self.result_queue(task_group_id)
        task_ids: dict[str, list[str]] = {}
        for function_id, payloads in document["tasks"].items():
            task_ids[function_id] = [
                str(self._dispatch(function_id, codes[function_id] + p, document, results))
                for p in payloads
            ]
        reply = {
            "request_id": str(uuid.uuid4()),
            "task_group_id": str(task_group_id),
            "endpoint_id": str(self.endpoint_id),
            "tasks": task_ids,
        }
        return 200, {}, json.dumps(reply)

    def _dispatch(
        self,
        function_id: str,
        task_buffer: str,
        submission: dict[str, Any],
        results: queue.Queue[bytes],
    ) -> uuid.UUID:
        """Hand one task to the engine as the endpoint does: the function's packed code and the
        task's packed arguments, concatenated, in a messagepack ``Task``."""
        task_id = uuid.uuid4()
        packed_task = messagepack.pack(Task(task_id=task_id, task_buffer=task_buffer))
        task_future = GCFuture(task_id, function_id=function_id)
        task_future.add_done_callback(lambda done: self._send_result(done, results))
        self.engine.submit(
            task_future,
            packed_task,
            resource_specification=submission.get("resource_specification") or {},
            result_serializers=submission.get("result_serializers"),
        )
        return task_id

    def _send_result(self, task_future: GCFuture, results: queue.Queue[bytes]) -> None:
        message = _result_message(task_future)
        with self._lock:
            self.result_sizes.append(len(message))
        results.put(message)


def _result_message(task_future: GCFuture) -> bytes:
    """The engine's packed ``Result``; engines always set one, but if one raised instead, the
    client gets the error rather than a future that never finishes."""
    try:
        message: bytes = task_future.result()
    except Exception as exc:
        details = ResultErrorDetails(code="EngineError", user_message=repr(exc))
        error = Result(task_id=task_future.gc_task_id, data=repr(exc), error_details=details)
        return messagepack.pack(error)
    return message


class _QueueChannel:
    """Stands in for the AMQP channel the SDK nacks on: a message that is not a ``Result``."""

    def basic_nack(self, delivery_tag: int, requeue: bool = False) -> None:
        raise RuntimeError(f"result message {delivery_tag} is not a messagepack Result")


class _QueueResultWatcher(executor_module._ResultWatcher):
    """The SDK's result watcher, reading one task group's queue of the stand-in instead of
    AMQP. Each message goes through the SDK's ``_on_message`` and ``_match_results_to_futures``,
    so futures are completed (or failed with ``TaskExecutionFailed``) by the SDK's own code."""

    _WAKE = b""  # not a message: there are new futures to match

    def __init__(
        self, task_group_id: uuid.UUID, client: Client, results: queue.Queue[bytes]
    ) -> None:
        super().__init__(task_group_id, client, poll_period_s=0.1)
        self._results = results

    def watch_for_task_results(self, executor: Executor, futures: list[Any]) -> int:
        watched: int = super().watch_for_task_results(executor, futures)
        self._results.put(self._WAKE)  # results may have arrived before their futures
        return watched

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        channel = _QueueChannel()
        delivery_tags = itertools.count(1)
        try:
            while not self._time_to_stop:
                with contextlib.suppress(queue.Empty):
                    body = self._results.get(timeout=self.poll_period_s)
                    if body != self._WAKE:
                        deliver = Basic.Deliver(delivery_tag=next(delivery_tags))
                        properties = BasicProperties(headers={}, timestamp=int(time.time()))
                        self._on_message(channel, deliver, properties, body)
                        self._to_ack.clear()
                if self._time_to_check_results.is_set():
                    self._time_to_check_results.clear()
                    self._match_results_to_futures()  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._fail_open_futures(exc)
            raise

    def _fail_open_futures(self, exc: Exception) -> None:
        with self._new_futures_lock:
            self._closed = True
            while self._open_futures:
                _, future = self._open_futures.popitem()
                future.set_exception(exc)
            self._open_futures_empty.set()


@dataclass
class OfflineCompute:
    """What a test gets: the executor to submit through, and the service and engine behind it."""

    executor: Executor
    service: ComputeServiceStandIn
    engine: GlobusComputeEngineBase


def offline_client() -> Client:
    """A real SDK ``Client`` that needs no login (a null authorizer) and asks no version."""
    return Client(authorizer=globus_sdk.NullAuthorizer(), do_version_check=False)


@contextlib.contextmanager
def offline_globus_compute(engine: GlobusComputeEngineBase) -> Iterator[OfflineCompute]:
    """A real ``Executor`` for the endpoint of ``engine`` (already started, see :func:`started`)
    through the stand-in service. On exit the executor and its result watchers are stopped and
    the SDK's process-wide state is reset, so the next executor does not reuse this one's task
    group (the SDK keeps it in ``Executor._default_task_group_id``) and wait forever on a
    watcher that no service feeds."""
    endpoint_id = engine.endpoint_id
    if endpoint_id is None:
        raise ValueError("the engine has no endpoint id: start it first (see started())")
    service = ComputeServiceStandIn(engine, endpoint_id)
    client = offline_client()

    def result_watcher(
        task_group_id: uuid.UUID, client: Client, port: int | None = None
    ) -> _QueueResultWatcher:
        return _QueueResultWatcher(task_group_id, client, service.result_queue(task_group_id))

    _reset_sdk_state()
    with (
        responses.RequestsMock(assert_all_requests_are_fired=False) as http,
        mock.patch.object(executor_module, "_ResultWatcher", result_watcher),
    ):
        service.install(http, client.web_service_address)
        executor = Executor(endpoint_id=endpoint_id, client=client)
        try:
            yield OfflineCompute(executor, service, engine)
        finally:
            _stop(executor)


def _stop(executor: Executor) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    executor._task_submitter.join(_STOP_TIMEOUT_S)
    watchers = list(executor_module._RESULT_WATCHERS.values())
    for watcher in watchers:
        watcher.shutdown(wait=False, cancel_futures=True)
    for watcher in watchers:
        watcher.join(_STOP_TIMEOUT_S)
    _reset_sdk_state()
    alive = [t for t in [executor._task_submitter, *watchers] if t.is_alive()]
    if alive:
        raise RuntimeError(f"Globus Compute threads still running after shutdown: {alive}")


def _reset_sdk_state() -> None:
    Executor._default_task_group_id = None
    executor_module._RESULT_WATCHERS.clear()


def process_pool_engine(workers: int = 2) -> ProcessPoolEngine:
    """The endpoint's process-pool engine (not started)."""
    return ProcessPoolEngine(max_workers=workers)


def htex_engine(workers: int = 2) -> GlobusComputeEngine:
    """The endpoint's default engine, Parsl's HighThroughputExecutor on this host (not started).

    It launches its interchange and workers as ``globus-compute-endpoint python-exec ...``, so
    this environment's ``bin`` must be on ``PATH``: the workers' launch script puts it there, and
    :func:`started` does while the engine starts its interchange."""
    return GlobusComputeEngine(
        address="127.0.0.1",
        max_workers_per_node=workers,
        cores_per_worker=0.1,  # HTEX starts no more workers than cores allow otherwise
        provider=LocalProvider(  # type: ignore[no-untyped-call]
            init_blocks=1,
            min_blocks=1,
            max_blocks=1,
            # Workers start in the temporary directory: started in a source checkout, Python
            # would import the checkout's proxy_patterns (which lacks .plugins) instead of the
            # installed package.
            worker_init=(
                f"cd {shlex.quote(tempfile.gettempdir())} && "
                f"export PATH={shlex.quote(_python_bin())}:$PATH"
            ),
        ),
    )


def _python_bin() -> str:
    return os.path.dirname(sys.executable)


@contextlib.contextmanager
def started(
    engine: GlobusComputeEngineBase, run_dir: str | Path
) -> Iterator[GlobusComputeEngineBase]:
    """``engine`` started in ``run_dir`` for a new endpoint id, and proven ready by one task run
    to its end (a process pool starts its workers then, so later timings do not include it);
    shut down on exit."""
    path = os.pathsep.join([_python_bin(), os.environ.get("PATH", "")])
    with mock.patch.dict(os.environ, {"PATH": path}):
        engine.start(endpoint_id=uuid.uuid4(), run_dir=str(run_dir))
    try:
        _run_one_task(engine)
        yield engine
    finally:
        engine.shutdown(block=True)


def _run_one_task(engine: GlobusComputeEngineBase) -> None:
    serializer = ComputeSerializer()
    buffers = [
        serializer.serialize(sum),
        serializer.serialize(([1, 2],)),
        serializer.serialize({}),
    ]
    task_id = uuid.uuid4()
    packed = messagepack.pack(Task(task_id=task_id, task_buffer=serializer.pack_buffers(buffers)))
    task_future = GCFuture(task_id)
    engine.submit(task_future, packed, resource_specification={})
    result = messagepack.unpack(task_future.result(timeout=120))
    if not isinstance(result, Result):
        raise RuntimeError(f"the engine sent {result!r} instead of a Result")
    if result.is_error:
        raise RuntimeError(f"the engine is not ready: {result.data}")
    if serializer.deserialize(result.data) != 3:
        raise RuntimeError(f"the engine computed sum([1, 2]) as {result.data!r}")
