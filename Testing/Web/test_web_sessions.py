"""One browser session per server: ``fastsam3d web`` on loopback, spoken to
over its real websocket (wslink's msgpack protocol) and HTTP, no browser.

A first session uploads a scan; a second connection is refused at the
handshake and receives none of the first one's state; the page itself answers
409 with the reason; once the first session leaves, the next one is admitted
and finds only the command-line scan (the upload and the segments are gone)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request

import pytest
from web_server import running_server

pytest.importorskip("trame_slicer", reason="the web extra is not installed: pip install -e .[web]")

import aiohttp  # noqa: E402
import msgpack  # noqa: E402
from wslink.chunking import UnChunker, generate_chunks  # noqa: E402

SECRET = "wslink-secret"          # trame's default token, which its page sends
UPLOAD_TRIGGER = re.compile(r"trigger\('(trigger__\d+)', \[\$event\.target\.files\]\)")


def _get(url):
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server(ct_path, tiny_model_file, tmp_path_factory):
    with running_server(ct_path, str(tiny_model_file), tmp_path_factory.mktemp("server")) as (url, port, log):
        yield {"url": url, "ws": f"ws://127.0.0.1:{port}/ws", "log": log}


class Client:
    """A wslink client: calls and every message received."""

    def __init__(self, ws):
        self.ws, self.unchunker, self.received, self.next_id, self.waiting = ws, UnChunker(), [], 0, {}
        self.unchunker.set_max_message_size(1 << 32)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            message = self.unchunker.process_chunk(msg.data)
            if message is None:
                continue
            if isinstance(message, (bytes, bytearray)):
                message = msgpack.unpackb(message)
            self.received.append(message)
            if message.get("id") in self.waiting:
                self.waiting.pop(message["id"]).set_result(message)

    async def call(self, method, args=(), system=False):
        self.next_id += 1
        rpc_id = f"{'system:' if system else 'rpc:'}c0:{self.next_id}"
        reply = asyncio.get_running_loop().create_future()
        self.waiting[rpc_id] = reply
        packed = msgpack.packb({"wslink": "1.0", "id": rpc_id, "method": method, "args": list(args), "kwargs": {}})
        for chunk in generate_chunks(packed, 4 * 1024 ** 2):
            await self.ws.send_bytes(chunk)
        return await asyncio.wait_for(reply, 60)

    async def hello(self):
        return await self.call("wslink.hello", [{"secret": SECRET}], system=True)

    async def close(self):
        await self.ws.close()
        self.reader.cancel()


async def _connect(http, server) -> Client:
    return Client(await http.ws_connect(server["ws"], max_msg_size=0))


def _text_of(value) -> str:
    """Every string in a reply (the page templates are among them)."""
    if isinstance(value, dict):
        return "\n".join(_text_of(v) for v in value.values())
    if isinstance(value, list):
        return "\n".join(_text_of(v) for v in value)
    return value if isinstance(value, str) else ""


def _volume_titles(state_reply) -> list[str]:
    return [v["title"] for v in state_reply["result"]["state"]["volumes"]]


def test_a_second_session_is_refused_and_the_next_finds_a_clean_scene(server, ct_path):
    async def scenario():
        async with aiohttp.ClientSession() as http:
            first = await _connect(http, server)
            assert "result" in await first.hello()
            state = await first.call("trame.state.get")
            assert _volume_titles(state) == ["example_ct"]
            # the first session uploads a scan of its own
            upload = UPLOAD_TRIGGER.search(_text_of(state)).group(1)
            content = ct_path.read_bytes()
            await first.call("trame.trigger", [upload, [[{"name": "private scan.nii.gz", "size": len(content),
                                                          "type": "", "content": content}]], {}])
            assert _volume_titles(await first.call("trame.state.get")) == ["example_ct", "private_scan"]

            # a second tab: the page says why, the handshake is refused, no state reaches it
            status, page = await asyncio.to_thread(_get, server["url"])
            assert status == 409 and "in use by another browser session" in page and "--port" in page
            second = await _connect(http, server)
            assert "error" in await second.hello()
            refused = await second.call("trame.state.get")
            assert "error" in refused and "result" not in refused
            await first.call("trame.state.update", [[{"key": "new_segment_name", "value": "liver"}]])
            await asyncio.sleep(1.0)                       # anything broadcast would have arrived by now
            leaked = str(second.received)
            assert "private_scan" not in leaked and "example_ct" not in leaked and "liver" not in leaked
            await second.close()

            # the first session leaves: the next one is admitted and sees nothing of it
            await first.close()
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(_get, server["url"]))[0] != 200:
                assert time.monotonic() < deadline, "the server stayed in use after the session left"
                await asyncio.sleep(0.2)
            third = await _connect(http, server)
            assert "result" in await third.hello()
            state = (await third.call("trame.state.get"))["result"]["state"]
            assert [v["title"] for v in state["volumes"]] == ["example_ct"]
            assert len(state["segments"]) == 1 and state["segments"][0]["voxels"] == 0
            assert state["new_segment_name"] == "" and state["status"]["revision"] == 0
            await third.close()
    asyncio.run(scenario())
    assert "Traceback" not in server["log"].read_text()
