from __future__ import annotations

import inspect
import logging

import pytest

from emitguard.testing import FakeSocket, ReferenceManager, SyncReferenceManager

LEGACY_LOGGER = "emitguard.testing.legacy"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LEGACY_LOGGER and record.levelno == logging.WARNING
    ]


# -- FakeSocket -----------------------------------------------------------------


async def test_fake_socket_records_in_order_and_refuses_when_closed() -> None:
    socket = FakeSocket("c1", "alice")
    await socket.send_json({"n": 1})
    socket.send_json_nowait({"n": 2})
    assert socket.received == [{"n": 1}, {"n": 2}]

    socket.close()
    assert socket.closed is True
    with pytest.raises(ConnectionError, match="socket c1 is closed"):
        await socket.send_json({"n": 3})
    with pytest.raises(ConnectionError, match="socket c1 is closed"):
        socket.send_json_nowait({"n": 3})
    assert socket.received == [{"n": 1}, {"n": 2}]


async def test_fake_socket_fail_next_fails_that_many_sends() -> None:
    socket = FakeSocket("c1", "alice")
    socket.fail_next = 2
    with pytest.raises(ConnectionError):
        await socket.send_json("a")
    with pytest.raises(ConnectionError):
        socket.send_json_nowait("b")
    assert socket.fail_next == 0
    await socket.send_json("c")
    assert socket.received == ["c"]
    assert socket.closed is False


# -- ReferenceManager -----------------------------------------------------------


async def test_connect_associate_send_happy_path() -> None:
    manager = ReferenceManager()
    socket = manager.connect("alice")
    assert socket.connection_id == "conn-1"
    assert socket.user_id == "alice"
    assert manager.threads_of("alice") == set()

    assert manager.update_connection_thread("alice", "t1") is True
    assert manager.threads_of("alice") == {"t1"}

    assert await manager.send_to_thread("t1", {"type": "agent_started"}) is True
    assert await manager.send_to_thread("t1", {"type": "agent_completed"}) is True
    expected = [{"type": "agent_started"}, {"type": "agent_completed"}]
    assert socket.received == expected
    assert manager.received("t1") == expected
    assert manager.delivered_log == {"t1": expected}
    assert manager.lost == 0


async def test_every_connection_of_the_thread_gets_a_copy() -> None:
    manager = ReferenceManager()
    first = manager.connect("alice")
    second = manager.connect("alice", "tab-2")
    other = manager.connect("bob")
    manager.update_connection_thread("alice", "t1")
    manager.update_connection_thread("bob", "t2")

    assert await manager.send_to_thread("t1", "hello") is True
    assert first.received == ["hello"]
    assert second.received == ["hello"]
    assert other.received == []
    # One log entry per socket that accepted the message.
    assert manager.received("t1") == ["hello", "hello"]
    assert manager.received("t2") == []


async def test_no_connection_warns_returns_false_and_counts_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReferenceManager()
    manager.connect("alice")  # connected, but not associated: the report's race
    caplog.set_level(logging.DEBUG, logger=LEGACY_LOGGER)

    assert await manager.send_to_thread("thread_374579bdba3c41b8", {"n": 1}) is False
    assert await manager.send_to_thread("thread_374579bdba3c41b8", {"n": 2}) is False

    messages = warnings_of(caplog)
    assert len(messages) == 2
    assert messages[0].startswith(
        "Cannot deliver message for thread thread_374579bdba3c41b8 - no connections"
    )
    assert manager.lost == 2
    assert manager.received("thread_374579bdba3c41b8") == []


def test_update_without_connections_warns_and_returns_false(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReferenceManager()
    caplog.set_level(logging.DEBUG, logger=LEGACY_LOGGER)
    assert manager.update_connection_thread("ghost", "t1") is False
    assert warnings_of(caplog) == ["No WebSocket connections found for user ghost"]


def test_custom_logger_is_used(caplog: pytest.LogCaptureFixture) -> None:
    manager = ReferenceManager(logger=logging.getLogger("my.legacy"))
    caplog.set_level(logging.WARNING, logger="my.legacy")
    manager.update_connection_thread("ghost", "t1")
    assert [record.name for record in caplog.records] == ["my.legacy"]


def test_connect_ids_are_generated_and_unique() -> None:
    manager = ReferenceManager()
    manager.connect("alice", "conn-2")
    assert manager.connect("bob").connection_id == "conn-1"
    assert manager.connect("bob").connection_id == "conn-3"
    with pytest.raises(ValueError, match="conn-2"):
        manager.connect("carol", "conn-2")
    assert [s.connection_id for s in manager.connections()] == [
        "conn-2",
        "conn-1",
        "conn-3",
    ]
    assert [s.connection_id for s in manager.connections("bob")] == ["conn-1", "conn-3"]


async def test_reassociation_moves_the_connection() -> None:
    manager = ReferenceManager()
    socket = manager.connect("alice")
    manager.update_connection_thread("alice", "t1")
    manager.update_connection_thread("alice", "t2")
    assert manager.threads_of("alice") == {"t2"}

    assert await manager.send_to_thread("t1", "old") is False
    assert await manager.send_to_thread("t2", "new") is True
    assert socket.received == ["new"]
    assert manager.received("t1") == []
    assert manager.received("t2") == ["new"]
    assert manager.lost == 1


async def test_disconnect_user_closes_and_removes_all_its_connections() -> None:
    manager = ReferenceManager()
    a1 = manager.connect("alice")
    a2 = manager.connect("alice")
    bob = manager.connect("bob")
    manager.update_connection_thread("alice", "t1")
    manager.update_connection_thread("bob", "t1")

    manager.disconnect_user("alice")
    assert a1.closed is True
    assert a2.closed is True
    assert bob.closed is False
    assert manager.connections("alice") == []
    assert manager.connections() == [bob]
    assert manager.threads_of("alice") == set()

    assert await manager.send_to_thread("t1", "x") is True
    assert bob.received == ["x"]
    assert a1.received == []
    assert a2.received == []

    manager.disconnect_user("bob")
    assert await manager.send_to_thread("t1", "y") is False
    assert manager.lost == 1


async def test_drop_connection_removes_only_that_connection() -> None:
    manager = ReferenceManager()
    kept = manager.connect("alice", "keep")
    dropped = manager.connect("alice", "drop")
    manager.update_connection_thread("alice", "t1")

    manager.drop_connection("drop")
    manager.drop_connection("drop")  # idempotent
    manager.drop_connection("never-existed")
    assert dropped.closed is True
    assert manager.connections("alice") == [kept]

    assert await manager.send_to_thread("t1", "x") is True
    assert kept.received == ["x"]
    assert dropped.received == []
    assert manager.received("t1") == ["x"]

    # A re-registered id is a new connection with no thread.
    manager.connect("alice", "drop")
    assert [s.connection_id for s in manager.connections("alice")] == ["keep", "drop"]
    assert await manager.send_to_thread("t1", "y") is True
    assert manager.received("t1") == ["x", "y"]


async def test_failing_socket_is_removed_and_others_still_receive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReferenceManager()
    bad = manager.connect("alice", "bad")
    good = manager.connect("alice", "good")
    manager.update_connection_thread("alice", "t1")
    bad.fail_next = 1
    caplog.set_level(logging.DEBUG, logger=LEGACY_LOGGER)

    assert await manager.send_to_thread("t1", "x") is True
    assert bad.received == []
    assert bad.closed is True
    assert good.received == ["x"]
    assert manager.connections("alice") == [good]
    assert manager.received("t1") == ["x"]
    assert manager.lost == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "bad" in errors[0]
    assert "t1" in errors[0]


async def test_all_sockets_failing_returns_false_and_counts_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = ReferenceManager()
    socket = manager.connect("alice")
    manager.update_connection_thread("alice", "t1")
    socket.fail_next = 1
    caplog.set_level(logging.DEBUG, logger=LEGACY_LOGGER)

    assert await manager.send_to_thread("t1", "x") is False
    assert manager.lost == 1
    assert manager.connections() == []
    assert manager.received("t1") == []
    assert any(m.startswith("Cannot deliver message for thread t1") for m in warnings_of(caplog))
    # The connection is gone, so the next send is the plain "no connections" case.
    assert await manager.send_to_thread("t1", "y") is False
    assert warnings_of(caplog)[-1].startswith(
        "Cannot deliver message for thread t1 - no connections"
    )
    assert manager.lost == 2


async def test_socket_closed_behind_the_managers_back_is_found_on_send() -> None:
    manager = ReferenceManager()
    socket = manager.connect("alice")
    socket.close()
    # Like the legacy manager, it does not know yet: the association succeeds.
    assert manager.update_connection_thread("alice", "t1") is True
    assert await manager.send_to_thread("t1", "x") is False
    assert manager.connections() == []
    assert manager.lost == 1


async def test_testing_flag_lies_about_success() -> None:
    manager = ReferenceManager(testing=True)
    socket = manager.connect("alice")
    manager.update_connection_thread("alice", "t1")

    assert await manager.send_to_thread("t1", "x") is True
    assert await manager.send_to_thread("nobody-here", "y") is True
    assert socket.received == []
    assert manager.received("t1") == []
    assert manager.delivered_log == {}
    assert manager.lost == 0


def test_received_returns_a_copy() -> None:
    manager = ReferenceManager()
    manager.received("t1").append("junk")
    assert manager.received("t1") == []
    assert manager.delivered_log == {}


# -- SyncReferenceManager -------------------------------------------------------


def test_sync_variant_send_is_synchronous() -> None:
    assert inspect.iscoroutinefunction(ReferenceManager.send_to_thread)
    assert not inspect.iscoroutinefunction(SyncReferenceManager.send_to_thread)


def test_sync_variant_delivers_warns_and_handles_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = SyncReferenceManager()
    caplog.set_level(logging.DEBUG, logger=LEGACY_LOGGER)
    first = manager.connect("alice")
    second = manager.connect("alice")

    assert manager.send_to_thread("t1", "early") is False
    assert warnings_of(caplog)[-1].startswith(
        "Cannot deliver message for thread t1 - no connections"
    )
    assert manager.lost == 1

    assert manager.update_connection_thread("alice", "t1") is True
    second.fail_next = 1
    assert manager.send_to_thread("t1", "a") is True
    assert manager.send_to_thread("t1", "b") is True
    assert first.received == ["a", "b"]
    assert second.received == []
    assert second.closed is True
    assert manager.connections() == [first]
    assert manager.received("t1") == ["a", "b"]
    assert manager.lost == 1


def test_sync_variant_testing_flag_lies() -> None:
    manager = SyncReferenceManager(testing=True)
    assert manager.send_to_thread("t1", "x") is True
    assert manager.delivered_log == {}
    assert manager.lost == 0
