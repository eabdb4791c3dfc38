"""The step drivers: one generator, run by a blocking and by an asyncio driver."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import pytest

from sqlalchemy_pgque._runloop import Steps, adrive, drive, within


class Recorder:
    """Both faces of one resource: sync and async calls record what ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def sync_call(self, name: str, result: Any = None, fail: bool = False) -> Any:
        self.calls.append(name)
        if fail:
            raise ValueError(name)
        return result

    async def async_call(self, name: str, result: Any = None, fail: bool = False) -> Any:
        await asyncio.sleep(0)
        return self.sync_call(name, result, fail)

    @contextmanager
    def sync_context(self) -> Iterator[None]:
        self.calls.append("enter")
        try:
            yield
        except BaseException as exc:
            self.calls.append(f"exit on {type(exc).__name__}")
            raise
        self.calls.append("exit")

    @asynccontextmanager
    async def async_context(self) -> Any:
        with self.sync_context():
            yield


def policy(call: Any, context: Any, fail_second: bool) -> Steps[int]:
    """The decisions: the second call's failure is handled, the rest sums results."""
    total = 0
    total += yield partial(call, "first", 1)
    try:
        total += yield partial(call, "second", 10, fail_second)
    except ValueError:
        total += 100
    total += yield from within(context, body(call))
    return int(total)


def body(call: Any) -> Steps[int]:
    value = yield partial(call, "inside", 1000)
    return int(value)


@pytest.mark.parametrize("fail_second", [False, True])
def test_one_policy_gives_the_same_result_and_calls_under_both_drivers(fail_second: bool) -> None:
    sync, asynchronous = Recorder(), Recorder()
    sync_total = drive(policy(sync.sync_call, sync.sync_context(), fail_second))
    async_total = asyncio.run(adrive(
        policy(asynchronous.async_call, asynchronous.async_context(), fail_second)
    ))
    assert sync_total == async_total == (1101 if fail_second else 1011)
    assert sync.calls == asynchronous.calls == ["first", "second", "enter", "inside", "exit"]


def failing_body(call: Any) -> Steps[None]:
    yield partial(call, "inside", None, True)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_within_exits_the_context_with_the_error_and_reraises_it(face: str) -> None:
    recorder = Recorder()
    if face == "sync":
        steps = within(recorder.sync_context(), failing_body(recorder.sync_call))
        with pytest.raises(ValueError, match="inside"):
            drive(steps)
    else:
        steps = within(recorder.async_context(), failing_body(recorder.async_call))
        with pytest.raises(ValueError, match="inside"):
            asyncio.run(adrive(steps))
    assert recorder.calls == ["enter", "inside", "exit on ValueError"]


def test_an_error_the_steps_do_not_handle_leaves_the_driver() -> None:
    def steps() -> Steps[None]:
        yield partial(int, "not a number")

    with pytest.raises(ValueError, match="invalid literal"):
        drive(steps())


def test_the_async_driver_is_cancellable_and_the_steps_see_the_cancel() -> None:
    seen: list[str] = []

    def steps() -> Steps[None]:
        try:
            yield partial(asyncio.sleep, 60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = asyncio.ensure_future(adrive(steps()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"]
