"""The API's transport writes: those of one loop turn leave together, framing untouched."""

from __future__ import annotations

import asyncio
from typing import Any

from oshepherd.api.coalesce import TurnWriter


class Transport(asyncio.Transport):
    """Records what reaches the socket: each call is one system call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", [bytes(d) for d in list_of_data]))

    def close(self) -> None:
        self.calls.append(("close",))

    def is_closing(self) -> bool:
        return False


def test_writes_of_one_turn_leave_in_one_call_in_order() -> None:
    async def main() -> list[Any]:
        transport = Transport()
        writer = TurnWriter(transport, asyncio.get_running_loop())
        for piece in (b"head", b"5\r\nline1\r\n", b"5\r\nline2\r\n"):
            writer.write(piece)
        assert transport.calls == []  # nothing yet: the turn goes on
        await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
        assert not writer.is_closing()  # the rest is the transport's own
        return transport.calls

    assert asyncio.run(main()) == [
        ("writelines", [b"head", b"5\r\nline1\r\n", b"5\r\nline2\r\n"]),
        ("writelines", [b"0\r\n\r\n"]),
    ]


def test_close_sends_what_is_pending_first() -> None:
    async def main() -> list[Any]:
        transport = Transport()
        writer = TurnWriter(transport, asyncio.get_running_loop())
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        return transport.calls

    assert asyncio.run(main()) == [
        ("writelines", [b"HTTP/1.1 400 Bad Request\r\n\r\n"]),
        ("close",),
    ]
