"""The server's socket (`server.bind`): the connections asyncio accepts on it have Nagle's algorithm
off, so a stream's small chunks are not held back for the client's delayed ACK (about 40 ms each
on a keep-alive connection)."""

from __future__ import annotations

import asyncio
import socket

from vitune.serving.server import bind


def test_accepted_connections_send_without_nagle():
    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=bind("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
