"""10. Runnables across machines: serve a chain with LangServe's protocol, call it remotely.

`asgi_app` turns runnables into an ASGI application that speaks LangServe's wire protocol;
`RemoteRunnable` calls it (or a real LangServe server) over HTTP. In production run the app
under any ASGI server (`uvicorn module:app --workers 4`); this example needs nothing
installed, so it serves the app with `serve_asgi` below, a minimal HTTP/1.1 server written
for examples and tests (one request per connection, no TLS: not for production).
"""
import asyncio
import itertools
import threading
from typing import Any, Dict, List, Tuple

from minichain import (
    AIMessage, ChatPromptTemplate, GenericFakeChatModel, RemoteRunnable, StrOutputParser,
    asgi_app,
)


def serve_asgi(app: Any, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, Any]:
    """Serve an ASGI app on a background thread; returns its base URL and a stop function."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    bound: List[Any] = []

    handlers: set = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        try:
            await answer(reader, writer)
        finally:
            writer.close()
            handlers.discard(asyncio.current_task())

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        body = await reader.readexactly(length)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "path": target.split("?")[0], "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
        received = False

        async def receive() -> Dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await reader.read()  # the client closing is the disconnect
            return {"type": "http.disconnect"}

        async def send(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                out = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
                out += [f"{k.decode()}: {v.decode()}" for k, v in message["headers"]]
                framed = not any(k.lower() == b"content-length" for k, _ in message["headers"])
                if framed:
                    out.append("transfer-encoding: chunked")
                send.framed = framed  # type: ignore[attr-defined]
                writer.write(("\r\n".join(out + ["connection: close", "", ""])).encode())
            else:
                data = message.get("body", b"")
                if send.framed:  # type: ignore[attr-defined]
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
                    if not message.get("more_body"):
                        writer.write(b"0\r\n\r\n")
                else:
                    writer.write(data)
            await writer.drain()
        try:
            await app(scope, receive, send)
        except (ConnectionError, OSError):
            pass

    async def main() -> None:
        server = await asyncio.start_server(handle, host, port)
        stopping = asyncio.Event()
        bound.extend([server, stopping])
        ready.set()
        await stopping.wait()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    def run() -> None:
        loop.run_until_complete(main())
        loop.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    url = "http://%s:%d" % bound[0].sockets[0].getsockname()[:2]

    def stop() -> None:
        loop.call_soon_threadsafe(bound[1].set)
        thread.join(timeout=5)
    return url, stop


joke = (ChatPromptTemplate.from_template("tell me a joke about {topic}")
        | GenericFakeChatModel(messages=itertools.cycle([AIMessage("Why did the parrot talk? It had a lot to say.")]))
        | StrOutputParser())
app = asgi_app({"/joke": joke})  # `uvicorn 10_remote:app` serves the same


def main() -> None:
    url, stop = serve_asgi(app)
    remote = RemoteRunnable(f"{url}/joke")
    print("invoke:", remote.invoke({"topic": "parrots"}))
    print("stream:", "|".join(remote.stream({"topic": "parrots"})))
    print("batch: ", remote.batch([{"topic": "cats"}, {"topic": "dogs"}]))
    events = remote.stream_events({"topic": "parrots"}, include_types=["chat_model"])
    print("server events:", [(e["event"], e["name"]) for e in events][:3], "...")

    async def local_events() -> List[Tuple[str, str]]:
        chain = remote | (lambda text: text.upper())
        return [(e["event"], e["name"]) async for e in chain.astream_events({"topic": "parrots"})]
    print("local events: ", asyncio.run(local_events()))
    stop()


if __name__ == "__main__":
    main()
