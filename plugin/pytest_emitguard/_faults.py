"""The ``emitguard_faults`` fixture: deterministic fault injection into a connection manager.

Faults go *below* the guard when the target is guarded (the original method under the
:class:`~emitguard_adapters.manager.GuardedMethod` proxy is replaced, so the guard sees the
fault as the manager's own behaviour) or onto the instance when it is not. The one exception is
:meth:`Faults.delay_association`, which sits *above* the guard: the code under test calls the
association, which returns at once, and the real call (through the guard) runs later.

Every fault keeps the sync/async shape of the method it replaces and is undone by
:meth:`Faults.undo`, which the fixture calls at teardown even when the test fails.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import wrapt

from emitguard import AdapterError
from emitguard.calls import Arg
from emitguard_adapters._params import parameters, resolve

__all__ = [
    "DelayedAssociation",
    "DroppedThread",
    "FailingSends",
    "Faults",
    "RaisingAssociation",
    "emitguard_faults",
]

log = logging.getLogger("emitguard.plugin.faults")

_PASS: Any = object()
"""A fault's pre-check returns this to let the call through to the original."""

Pre = Callable[[tuple[Any, ...], dict[str, Any]], Any]
Post = Callable[[tuple[Any, ...], dict[str, Any], Any], None]


# ----------------------------------------------------------------------------- handles


@dataclass
class DelayedAssociation:
    """What :meth:`Faults.delay_association` did: ``calls`` intercepted, ``completed`` real
    calls that returned (their ``results``), real calls that raised (``errors``)."""

    seconds: float
    calls: int = 0
    completed: int = 0
    results: list[Any] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _timers: list[asyncio.TimerHandle] = field(default_factory=list, repr=False)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list, repr=False)

    @property
    def pending(self) -> int:
        """Real calls not finished yet (scheduled or running)."""
        return self.calls - self.completed - len(self.errors)

    def cancel(self) -> None:
        """Cancel every real call that has not run yet."""
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            if not task.done() and not task.get_loop().is_closed():
                task.cancel()


@dataclass
class DroppedThread:
    """What :meth:`Faults.drop_after` did: ``delivered`` successful sends to the thread,
    ``refused`` sends that returned False because the connection was dropped."""

    thread_id: str
    n: int
    delivered: int = 0
    refused: int = 0
    dropped: bool = False
    drops: int = 0

    def reconnect(self) -> None:
        """End the drop: sends to the thread go through again (an association does this)."""
        self.dropped = False


@dataclass
class FailingSends:
    """What :meth:`Faults.fail_sends` did: ``calls`` seen, ``failures`` injected, and the
    1-based numbers of the calls that failed (``failed_calls``)."""

    calls: int = 0
    failures: int = 0
    failed_calls: list[int] = field(default_factory=list)


@dataclass
class RaisingAssociation:
    """What :meth:`Faults.raise_on_association` did: ``calls`` seen, ``raised`` errors."""

    times: int
    calls: int = 0
    raised: int = 0

    @property
    def remaining(self) -> int:
        """Association calls that will still raise."""
        return self.times - self.raised


# ----------------------------------------------------------------------------- faults


class Faults:
    """Fault injection into manager instances; see the module docstring."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Future[Any]] = set()

    def delay_association(
        self, target: Any, seconds: float, method: str = "update_connection_thread"
    ) -> DelayedAssociation:
        """Association calls return at once (True); the real call runs ``seconds`` later."""
        seconds = _seconds(seconds)
        _method_name(method, "method")
        real = getattr(target, method, None)  # as it is now: through the guard if guarded
        if real is None or not callable(real):
            raise ValueError(f"method: {_label(target)} has no method {method!r}")
        handle = DelayedAssociation(seconds)
        is_async = inspect.iscoroutinefunction(_shape_of(target, method))

        def forget(item: asyncio.TimerHandle | asyncio.Task[Any]) -> None:
            if isinstance(item, asyncio.Task):
                if item in handle._tasks:
                    handle._tasks.remove(item)
            elif item in handle._timers:
                handle._timers.remove(item)

        def settle(result: Any, error: BaseException | None) -> None:
            if error is not None:
                handle.errors.append(error)
                log.warning("delayed %s.%s raised %r", _label(target), method, error)
            else:
                handle.completed += 1
                handle.results.append(result)

        def schedule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    f"delay_association: {_label(target)}.{method} was called with no running "
                    f"event loop; the delayed call needs one"
                ) from None
            handle.calls += 1
            timer: asyncio.TimerHandle

            def fire() -> None:
                forget(timer)
                if is_async:
                    task = loop.create_task(run_async())
                    handle._tasks.append(task)
                    task.add_done_callback(forget)
                    return
                try:
                    result = real(*args, **kwargs)
                except Exception as exc:
                    settle(None, exc)
                else:
                    settle(result, None)

            async def run_async() -> None:
                try:
                    result = await real(*args, **kwargs)
                except Exception as exc:
                    settle(None, exc)
                else:
                    settle(result, None)

            timer = loop.call_later(seconds, fire)
            handle._timers.append(timer)

        def pre(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            schedule(args, kwargs)
            return True

        delayed = _shaped(real, is_async, pre)
        restore = _set_on_instance(target, method, delayed)

        def undo() -> None:
            handle.cancel()
            restore()

        self._undo.append(undo)
        return handle

    def drop_after(
        self,
        target: Any,
        thread_id: str,
        n: int,
        send: str = "send_to_thread",
        disconnect: str | None = None,
        *,
        disconnect_args: Sequence[Any] = (),
        associate: str | None = "update_connection_thread",
        thread_param: str | int | None = None,
    ) -> DroppedThread:
        """After the ``n``-th successful delivery to ``thread_id`` its connection drops: later
        sends to it return False, until an association of the thread succeeds (``associate``,
        watched below the guard; None: only :meth:`DroppedThread.reconnect` ends the drop).

        ``disconnect`` names a method called (as it is on the target, with
        ``disconnect_args``) at the moment of the drop.

        The thread argument of ``send`` and ``associate`` is found the way the guard finds
        it: by ``thread_param`` (a parameter name or a position) when given, else by the
        guard's own ``thread_param`` when the target is guarded, else by the name
        ``"thread_id"``. A method without that parameter is refused with :class:`ValueError`
        here, instead of a fault that never fires.
        """
        if not isinstance(thread_id, str) or not thread_id:
            raise ValueError(f"thread_id must be a non-empty string, got {thread_id!r}")
        n = _count(n, "n", minimum=0)
        _method_name(send, "send")
        if disconnect is not None:
            _method_name(disconnect, "disconnect")
            if not callable(getattr(target, disconnect, None)):
                raise ValueError(f"disconnect: {_label(target)} has no method {disconnect!r}")
        if associate is not None:
            _method_name(associate, "associate")
        if thread_param is None:
            thread_param = _guard_thread_param(target, send)
        thread = _thread_arg(target, send, thread_param, "drop_after")
        healing = (
            _thread_arg(target, associate, thread_param, "drop_after")
            if associate is not None
            else None
        )
        handle = DroppedThread(thread_id, n)

        def drop() -> None:
            handle.dropped = True
            handle.drops += 1
            if disconnect is None:
                return
            result = getattr(target, disconnect)(*disconnect_args)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        def pre(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if handle.dropped and thread.pick(args, kwargs) == thread_id:
                handle.refused += 1
                return False
            return _PASS

        def post(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
            if thread.pick(args, kwargs) != thread_id:
                return
            if not result and result is not None:
                return
            handle.delivered += 1
            if handle.delivered == n and not handle.drops:
                drop()

        self._below(target, send, pre, post)
        if associate is not None and healing is not None:
            associated = healing

            def healed(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
                ok = result or result is None
                if ok and associated.pick(args, kwargs) == thread_id:
                    handle.reconnect()

            self._below(target, associate, None, healed)
        if n == 0:
            drop()
        return handle

    def fail_sends(
        self,
        target: Any,
        every: int | None = None,
        rate: float | None = None,
        seed: int = 0,
        send: str = "send_to_thread",
        error: BaseException | type[BaseException] | None = None,
    ) -> FailingSends:
        """Fail every ``every``-th send, or sends at a seeded random ``rate`` (0..1): the
        original is not called and the send returns False, or raises ``error`` if given.

        The fault sits under the guard and counts every call of the original, whoever makes
        it: the guard's own retries and outbox flushes are sends too, so with ``every=3`` a
        flush can be the third call and fail (as a flaky network would fail it). The guard then
        keeps the event buffered and retries; :attr:`FailingSends.failed_calls` says which
        calls failed.
        """
        if (every is None) == (rate is None):
            raise ValueError(
                f"give exactly one of every= or rate=, got every={every!r}, rate={rate!r}"
            )
        if every is not None:
            every = _count(every, "every", minimum=1)
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1
        ):
            raise ValueError(f"rate must be a number from 0 to 1, got {rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _method_name(send, "send")
        _check_error(error)
        handle = FailingSends()
        rng = random.Random(seed)

        def pre(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            handle.calls += 1
            if every is not None:
                fail = handle.calls % every == 0
            else:
                fail = rng.random() < float(rate or 0)
            if not fail:
                return _PASS
            handle.failures += 1
            handle.failed_calls.append(handle.calls)
            if error is not None:
                raise _instance(error, f"injected send failure (call {handle.calls})")
            return False

        self._below(target, send, pre, None)
        return handle

    def raise_on_association(
        self,
        target: Any,
        error: BaseException | type[BaseException],
        times: int = 1,
        method: str = "update_connection_thread",
    ) -> RaisingAssociation:
        """The next ``times`` association calls raise ``error`` (below the guard, so a guard
        marks the thread ERROR); later calls go through."""
        if error is None:
            raise ValueError("error must be an exception instance or class, got None")
        _check_error(error)
        times = _count(times, "times", minimum=1)
        _method_name(method, "method")
        handle = RaisingAssociation(times)

        def pre(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            handle.calls += 1
            if handle.raised >= times:
                return _PASS
            handle.raised += 1
            raise _instance(error, f"injected association failure ({handle.raised}/{times})")

        self._below(target, method, pre, None)
        return handle

    def undo(self) -> None:
        """Remove every fault, newest first, restoring the exact original attributes.
        Calling it again does nothing."""
        errors: list[BaseException] = []
        for task in list(self._tasks):
            if not task.done() and not task.get_loop().is_closed():
                task.cancel()
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # undo the rest before reporting
                errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ internals

    def _below(self, target: Any, name: str, pre: Pre | None, post: Post | None) -> None:
        original = _underneath(target, name)
        faulty = _shaped(original, inspect.iscoroutinefunction(original), pre, post)
        self._undo.append(_set_underneath(target, name, faulty))


def _shaped(
    original: Callable[..., Any], is_async: bool, pre: Pre | None, post: Post | None = None
) -> Callable[..., Any]:
    """A callable shaped like ``original`` (sync or async): ``pre`` may answer instead of it
    (anything but ``_PASS``) or raise; ``post`` sees the original's result."""
    if is_async:

        async def faulty_async(*args: Any, **kwargs: Any) -> Any:
            if pre is not None:
                answer = pre(args, kwargs)
                if answer is not _PASS:
                    return answer
            result = await original(*args, **kwargs)
            if post is not None:
                post(args, kwargs, result)
            return result

        return functools.wraps(original)(faulty_async)

    def faulty(*args: Any, **kwargs: Any) -> Any:
        if pre is not None:
            answer = pre(args, kwargs)
            if answer is not _PASS:
                return answer
        result = original(*args, **kwargs)
        if post is not None:
            post(args, kwargs, result)
        return result

    return functools.wraps(original)(faulty)


def _is_guarded(raw: Any) -> bool:
    """A manager method wrapped by emitguard. Duck-typed on purpose: an in-process pytester
    run can re-import the adapter module, leaving two GuardedMethod classes around."""
    return (
        isinstance(raw, wrapt.FunctionWrapper) and getattr(raw, "_self_adapter", None) is not None
    )


def _guarded_method(target: Any, name: str) -> Any:
    """The instance's own GuardedMethod proxy for ``name``, or None when unguarded."""
    raw = inspect.getattr_static(target, name, None)
    if not _is_guarded(raw):
        return None
    if isinstance(target, type) or name not in _own(target):
        raise TypeError(
            f"{_label(target)}.{name} is guarded on its class; faults go below a guard on the "
            f"instance only: guard the instance (emitguard.guard(manager)) instead"
        )
    return raw


def _shape_of(target: Any, name: str) -> Any:
    """The callable whose sync/async shape the code under test sees (under any guard)."""
    raw = inspect.getattr_static(target, name, None)
    return raw.__wrapped__ if _is_guarded(raw) else getattr(target, name)


def _underneath(target: Any, name: str) -> Callable[..., Any]:
    """The original callable under the guard, or the bound method when unguarded."""
    if isinstance(target, (type, str)):
        raise TypeError(f"faults take a manager instance, got {target!r}")
    proxy = _guarded_method(target, name)
    if proxy is not None:
        inner: Callable[..., Any] = proxy.__wrapped__
        return inner
    method = getattr(target, name, None)
    if method is None or not callable(method):
        raise ValueError(f"{_label(target)} has no method {name!r}")
    return method  # type: ignore[no-any-return]


def _set_underneath(target: Any, name: str, faulty: Callable[..., Any]) -> Callable[[], None]:
    """Put ``faulty`` under the guard (or on the instance); return how to undo it."""
    proxy = _guarded_method(target, name)
    if proxy is None:
        return _set_on_instance(target, name, faulty)
    original = proxy.__wrapped__
    proxy.__wrapped__ = faulty

    def undo() -> None:
        if proxy.__wrapped__ is not faulty:
            log.warning("%s.%s was changed under a fault; left as it is", _label(target), name)
            return
        proxy.__wrapped__ = original

    return undo


def _set_on_instance(target: Any, name: str, value: Callable[..., Any]) -> Callable[[], None]:
    """Set an instance attribute; return how to put back the exact previous state."""
    if isinstance(target, (type, str)):
        raise TypeError(f"faults take a manager instance, got {target!r}")
    own = _own(target)
    had_own = name in own
    previous = own.get(name)
    setattr(target, name, value)

    def undo() -> None:
        if _own(target).get(name) is not value:
            log.warning("%s.%s was replaced after a fault; left as it is", _label(target), name)
            return
        if had_own:
            setattr(target, name, previous)
        else:
            delattr(target, name)

    return undo


def _own(target: Any) -> dict[str, Any]:
    try:
        own: dict[str, Any] = vars(target)
    except TypeError:
        raise TypeError(f"{_label(target)} has no __dict__; faults cannot be set on it") from None
    return own


def _guard_thread_param(target: Any, send: str) -> str | int:
    """The ``thread_param`` the target's guard was given (through its ``send`` method), or
    the adapter's default ``"thread_id"`` when the target is not guarded."""
    proxy = _guarded_method(target, send)
    roles = getattr(getattr(proxy, "_self_adapter", None), "roles", None) or {}
    wanted = roles.get("thread_param")
    if isinstance(wanted, dict):  # given per role: the send's
        wanted = wanted.get("send", "thread_id")
    if isinstance(wanted, (tuple, list)) and wanted:  # aliases: the first
        wanted = wanted[0]
    return wanted if isinstance(wanted, (str, int)) else "thread_id"


def _thread_arg(target: Any, name: str, wanted: str | int, fault: str) -> Arg:
    """Where the thread is in calls of ``target.<name>``, found the way the manager adapter
    finds it; a :class:`ValueError` that names the parameters and the option when it is not
    there."""
    func = _underneath(target, name)
    try:
        params = parameters(func, bound=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{fault}: cannot read the signature of {_label(target)}.{name} ({exc}); "
            f"pass thread_param= with a position"
        ) from None
    try:
        return resolve(params, wanted, where=f"{_label(target)}.{name}", option="thread_param")
    except AdapterError as exc:
        raise ValueError(f"{fault}: {exc}") from None


def _count(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"seconds must be a number >= 0, got {value!r}")
    return float(value)


def _method_name(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"{name} must be a method name, got {value!r}")


def _check_error(error: Any) -> None:
    if error is None:
        return
    if isinstance(error, BaseException):
        return
    if isinstance(error, type) and issubclass(error, BaseException):
        return
    raise ValueError(f"error must be an exception instance or class, got {error!r}")


def _instance(error: BaseException | type[BaseException], text: str) -> BaseException:
    return error(text) if isinstance(error, type) else error


def _label(target: Any) -> str:
    return f"{type(target).__qualname__} instance"


@pytest.fixture
def emitguard_faults(emitguard_guard: Any) -> Iterator[Faults]:
    """Deterministic faults for manager instances, undone at teardown even if the test fails.

    It depends on ``emitguard_guard`` so that its faults are undone before that fixture
    unguards its targets.
    """
    faults = Faults()
    try:
        yield faults
    finally:
        faults.undo()
