"""9. A real model server: the guide's joke chain streamed over HTTP, token by token.

With `OPENAI_BASE_URL` (any OpenAI-compatible server), `OLLAMA_HOST` or `ANTHROPIC_API_KEY`
set, it talks to that server. Without, it starts a local server that replays a stream
captured byte-exact from llama.cpp's server (SmolLM2-135M), so you still see real HTTP
chunks arrive and a real usage report. Pass `--replay` to force that.
"""
import http.server
import os
import sys
import threading
import time
from pathlib import Path

from minichain import ChatOpenAI, ChatPromptTemplate, StrOutputParser, demo_model

CAPTURE = Path(__file__).parent / "fixtures" / "llamacpp-server_chat_stream_usage.raw"


def replay_server() -> str:
    """Serve the captured chunked body, one HTTP chunk every 20 ms, on 127.0.0.1."""
    raw = CAPTURE.read_bytes()

    class Replay(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in raw.split(b"\r\n\r\n"):  # roughly one event per write
                self.wfile.write(piece + b"\r\n\r\n" if piece else b"")
                self.wfile.flush()
                time.sleep(0.02)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


named = any(os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_HOST",
                                          "ANTHROPIC_API_KEY"))
if named and "--replay" not in sys.argv:
    model = demo_model()
else:
    model = ChatOpenAI(model="smollm2-135m", base_url=replay_server(), api_key="not-needed")

prompt = ChatPromptTemplate.from_template("tell me a joke about {topic}")
chain = prompt | model | StrOutputParser()
for chunk in chain.stream({"topic": "parrot"}):
    print(chunk, end="|", flush=True)
print()

answer = model.invoke("tell me a joke about parrot") if not named or "--replay" in sys.argv else None
if answer is not None:
    print("usage:", answer.usage_metadata, "finish:", answer.response_metadata["finish_reason"])
