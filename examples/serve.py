"""10. Streaming to a browser: a page that shows the answer token by token, and the JSON
parser's partial object as it grows, from a chain's events sent as server-sent events.

    python examples/serve.py 8000        # then open http://127.0.0.1:8000/

Standard library only: `http.server` serves the page and an endpoint that runs the chain
with `stream_events` and writes `to_sse(...)` as it goes. By default the fake model answers
(with a delay per token so you can watch it stream); set OPENAI_BASE_URL, OLLAMA_HOST or
ANTHROPIC_API_KEY to use a real model. Closing the page stops the run on the server.
"""
import http.server
import itertools
import os
import sys
import threading
import urllib.parse
from typing import Any, Callable, Optional

from minichain import (ChatPromptTemplate, GenericFakeChatModel, JsonOutputParser,
                       StrOutputParser, demo_model, to_sse)

ANSWER = ('{"joke": "Why do parrots make terrible secret keepers? They repeat everything!", '
          '"rating": 7}')
SERVERS = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_HOST", "ANTHROPIC_API_KEY")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>minichain: streaming to a browser</title>
<style>body{font-family:system-ui,sans-serif;max-width:44em;margin:2em auto;padding:0 1em}
pre{background:#f4f4f4;padding:1em;white-space:pre-wrap;min-height:2em}</style></head>
<body>
<h1>A joke about <input id="topic" value="parrot"> <button id="go">Tell me</button></h1>
<h2>The answer, token by token</h2><pre id="answer"></pre>
<h2>The JSON parser's partial object</h2><pre id="json"></pre>
<p>Status: <span id="status">idle</span></p>
<script>
function start() {
  const answer = document.getElementById("answer");
  const json = document.getElementById("json");
  const status = document.getElementById("status");
  answer.textContent = ""; json.textContent = ""; status.textContent = "streaming";
  const topic = encodeURIComponent(document.getElementById("topic").value);
  const source = new EventSource("/events?topic=" + topic);
  source.addEventListener("on_parser_stream", (message) => {
    const event = JSON.parse(message.data);
    if (event.name === "text") answer.textContent += event.data.chunk;
    if (event.name === "json") json.textContent = JSON.stringify(event.data.chunk, null, 1);
  });
  source.addEventListener("end", () => { source.close(); status.textContent = "done"; });
  source.addEventListener("error", (message) => {
    source.close();
    status.textContent = message.data ? "error: " + JSON.parse(message.data).message : "connection lost";
  });
}
document.getElementById("go").onclick = start;
start();
</script>
</body></html>
"""


def make_chain(delay: float = 0.05) -> Any:
    """prompt | model | {text: str parser, json: JSON parser}: one answer, two views of it."""
    if any(os.environ.get(name) for name in SERVERS):
        model = demo_model()
    else:
        model = GenericFakeChatModel(messages=itertools.repeat(ANSWER), sleep=delay)
    prompt = ChatPromptTemplate.from_template(
        'Tell me a joke about {topic}. Answer in JSON with the keys "joke" and "rating" (1-10).')
    return prompt | model | {"text": StrOutputParser().with_config(run_name="text"),
                             "json": JsonOutputParser().with_config(run_name="json")}


def serve(port: int, chain_factory: Callable[[], Any] = make_chain,
          host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """Start serving on a background thread; returns the server (call .shutdown() to stop)."""
    chain = chain_factory()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/":
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif url.path == "/events":
                topic = urllib.parse.parse_qs(url.query).get("topic", ["parrot"])[0]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("X-Accel-Buffering", "no")
                self.send_header("Connection", "close")
                self.end_headers()
                events = chain.stream_events({"topic": topic}, include_names=["text", "json"])
                stream = to_sse(events)
                try:
                    for data in stream:
                        self.wfile.write(data)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the page went away
                finally:
                    stream.close()  # stops the run and closes every step
                self.close_connection = True
            else:
                self.send_error(404, "not found: try / or /events?topic=parrot")

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def main(argv: Optional[list] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    port = int(args[0]) if args else 8000
    server = serve(port)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
