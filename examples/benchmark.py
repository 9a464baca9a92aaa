"""Benchmark: minichain against langchain_core and against bare generators.

Each implementation runs in its own subprocess, on the same inputs, several times; the table
shows medians and ratios (ratios are what to read on a noisy machine). Implementations:

- minichain (this repository);
- langchain_core, when an interpreter that has it is given (`--lc-python PATH`, or it is
  importable here): `pip install 'langchain-core==1.7.2'` in a separate virtualenv;
- bare: hand-written generators and async generators doing the same work with no framework,
  the floor to compare against. For JSON, "bare" is an independent partial parser written
  here (`bare_partial_json`): it scans each chunk once, tracking open containers and strings,
  and parses the text seen, closed, with json.loads at the end; it yields no snapshots, so it
  is the cost of reading the text once. For events, "bare" is the same
  three-stage pipeline where each stage builds the 7-key v2 event dicts a listener would
  (per chunk, with the run's name, id, parents, tags and metadata) and the outer generator
  hands them over after every chunk.

Event workloads, on `prompt | GenericFakeChatModel | StrOutputParser` (minichain's own fake, or
langchain_core's, with an answer of N words, so ~2N chunks, no sleep):

- time to first event: from calling `astream_events` / `stream_events` to receiving the first
  event, after a one-word warm-up run; at 2k and 200k chunks;
- peak memory with a slow consumer: tracemalloc's peak while consuming every event with a
  consumer that is slow, meaning it sleeps 1 ms (`asyncio.sleep` / `time.sleep`) after every
  1,000 events, so it falls behind a producer that never waits; at 2k and 200k chunks. A
  framework that buffers every event grows with the run; one that waits for its consumer
  stays flat. tracemalloc slows every allocation, so a 200k-chunk run takes seconds here;
  the table prints each run's time under tracemalloc.

"peak memory ..., no listener" streams the same chain with `stream` and the library's own fake
at 2k and 200k chunks (the answer string is built before tracing; the fake's chunks count).

Run from the repository root:  python examples/benchmark.py [--lc-python /path/to/python]
Only some rows:  python examples/benchmark.py --only first_event,slow_memory
(sections: import, stream, astream, astream_events, invoke, stream_events, abatch, json,
json_shapes, memory, first_event, slow_memory)

JSON shapes: each input shape that once made a partial JSON parser quadratic (prose with no
JSON, a flat array, a bracket per chunk, a long number or string a character per chunk, a wide
object, a deep object), at two sizes, in snapshot and diff mode; the table prints the time at
the larger size and the growth exponent between the two (1 is linear, 2 quadratic). Snapshot
mode copies the open containers for every snapshot, so where the path itself grows with the
input (a flat array, deep nesting) the snapshots are what grows: diff mode shows the parser.
"""
import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORDS = 2000  # the long answer: 2,000 words, so ~4,000 chunks
EVENT_CHUNKS = [2_000, 200_000]  # sizes for time to first event and slow-consumer memory
SLOW_EVERY, SLOW_SLEEP = 1_000, 0.001  # the slow consumer: sleeps 1 ms every 1,000 events
JSON_SIZES = [1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000]
JSON_SHAPE_SIZES = [50_000, 100_000]  # characters, about
LC_SHAPE_BUDGET = 30.0  # seconds langchain_core may spend on one shape at one size
LC_JSON_BUDGET = 150.0  # seconds langchain_core may spend on one JSON size
LC_FIRST_EVENT_BUDGET = 120.0  # seconds one langchain_core time-to-first-event run may take


# ---------------------------------------------------------------------------------------------
# Workers: run inside a subprocess, print one JSON line of measurements
# ---------------------------------------------------------------------------------------------

def _answer(words: int = WORDS) -> str:
    return " ".join(f"word{i % 97}" for i in range(words))


def _words_for(chunks: int) -> int:
    """The fake splits N words into 2N - 1 chunks (words and the spaces between them)."""
    return (chunks + 1) // 2


def json_doc(size: int) -> str:
    """A JSON document of about `size` bytes shaped like model output: records with strings,
    numbers, flags, a nested object and a short list."""
    items, length, i = [], 20, 0
    while length < size:
        item = {"id": i, "name": f"item number {i}", "score": round(i * 1.37, 2),
                "active": i % 3 == 0, "tags": ["alpha", "beta"][: 1 + i % 2],
                "detail": {"note": "a short note with \"quotes\" and \u00e9", "rank": i % 7}}
        items.append(item)
        length += len(json.dumps(item)) + 2
        i += 1
    return json.dumps({"title": "benchmark", "items": items})


def chunks_of(text: str, n: int = 4) -> List[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def json_shapes(n: int) -> Dict[str, List[str]]:
    """The chunks of each JSON shape at about `n` characters."""
    prose = ("The model ignored the format and wrote prose instead. " * (n // 50 + 1))[:n]
    flat = "[" + ", ".join(str(i % 100) for i in range(n // 3)) + "]"
    wide = json.dumps({f"k{i}": i for i in range(n // 8)})
    return {
        "prose, no JSON": chunks_of(prose),
        "flat array of ints": chunks_of(flat),
        "a bracket per chunk": ["["] * (n // 20),
        "long number, a digit per chunk": ["[0."] + ["1"] * n,
        "long string, a char per chunk": ['{"s": "'] + ["a"] * n + ['"}'],
        "wide object": chunks_of(wide),
        "deep object": ['{"a": '] * (n // 20) + ["1"],
    }


def bare_partial_json(pieces: Iterator[str]) -> Any:
    """An independent partial JSON parser, the floor: one pass over each chunk tracking the
    open containers and whether a string is open, then json.loads of the text seen, closed
    where it stops (None where that is not JSON)."""
    closers: List[str] = []
    in_string = escaped = False
    seen = []
    for piece in pieces:
        seen.append(piece)
        for c in piece:
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c == "[" or c == "{":
                closers.append("]" if c == "[" else "}")
            elif (c == "]" or c == "}") and closers:
                closers.pop()
    text = "".join(seen).rstrip().rstrip(",")
    if in_string:
        text += '"'
    text += "".join(reversed(closers))
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def lib(name: str) -> Dict[str, Any]:
    """The names a workload needs, from minichain or langchain_core."""
    if name == "minichain":
        sys.path.insert(0, ROOT)
        import minichain as m
        return vars(m)
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    return {"GenericFakeChatModel": GenericFakeChatModel, "StrOutputParser": StrOutputParser,
            "ChatPromptTemplate": ChatPromptTemplate, "JsonOutputParser": JsonOutputParser}


def make_chain(m: Dict[str, Any], answers: Iterator[str]) -> Any:
    prompt = m["ChatPromptTemplate"].from_template("tell me a story about {topic}")
    return prompt | m["GenericFakeChatModel"](messages=answers) | m["StrOutputParser"]()


class Chunk:
    """The bare version's message chunk: the same fields as a LangChain message chunk, set
    with no checks."""
    __slots__ = ("content", "id", "additional_kwargs", "response_metadata", "tool_calls",
                 "invalid_tool_calls", "tool_call_chunks", "usage_metadata", "name",
                 "chunk_position")

    def __init__(self, content: str, id: str) -> None:
        self.content, self.id, self.name, self.usage_metadata = content, id, None, None
        self.additional_kwargs, self.response_metadata = {}, {}
        self.tool_calls, self.invalid_tool_calls, self.tool_call_chunks = [], [], []
        self.chunk_position = None


def bare_stream(topic: str, answer: str) -> Iterator[str]:
    """prompt -> model -> parser as three plain generators."""
    import re

    def prompt(inputs: Iterator[Dict[str, str]]) -> Iterator[List[Any]]:
        for x in inputs:
            yield [("human", f"tell me a story about {x['topic']}")]

    def model(prompts: Iterator[List[Any]]) -> Iterator[Chunk]:
        for _ in prompts:
            for part in re.split(r"(\s)", answer):
                yield Chunk(part, "run-1")

    def parser(chunks: Iterator[Chunk]) -> Iterator[str]:
        for chunk in chunks:
            yield chunk.content
    return parser(model(prompt(iter([{"topic": topic}]))))


async def bare_astream(topic: str, answer: str) -> AsyncIterator[str]:
    import re

    async def prompt() -> AsyncIterator[List[Any]]:
        yield [("human", f"tell me a story about {topic}")]

    async def model(prompts: AsyncIterator[List[Any]]) -> AsyncIterator[Chunk]:
        async for _ in prompts:
            for part in re.split(r"(\s)", answer):
                yield Chunk(part, "run-1")

    async def parser(chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        async for chunk in chunks:
            yield chunk.content
    async for out in parser(model(prompt())):
        yield out


def _bare_runs(topic: str) -> Dict[str, Any]:
    """The four runs of the chain (name, id, parent ids, tags, metadata), as a listener keeps
    them: built once per run, shared by that run's events."""
    import uuid
    root = str(uuid.uuid4())
    meta = {"ls_provider": "genericfakechatmodel", "ls_model_type": "chat",
            "ls_integration": "langchain_chat_model"}
    return {"chain": ("RunnableSequence", root, [], [], {}),
            "prompt": ("ChatPromptTemplate", str(uuid.uuid4()), [root], ["seq:step:1"], {}),
            "chat_model": ("GenericFakeChatModel", str(uuid.uuid4()), [root], ["seq:step:2"], meta),
            "parser": ("StrOutputParser", str(uuid.uuid4()), [root], ["seq:step:3"], {}),
            "input": {"topic": topic}}


def _event(event: str, run: Any, data: Dict[str, Any]) -> Dict[str, Any]:
    name, run_id, parent_ids, tags, metadata = run
    return {"event": event, "name": name, "run_id": run_id, "parent_ids": parent_ids,
            "tags": tags, "metadata": metadata, "data": data}


def bare_stream_events(topic: str, answer: str) -> Iterator[Dict[str, Any]]:
    """The events of prompt -> model -> parser from three plain generators: each stage builds
    its v2 event dicts into a buffer that the outer generator empties after every chunk. The
    same events, in the same order, as minichain's `stream_events`. Each run keeps the text
    of its chunks (not the chunks) for its end event's aggregate output."""
    import collections
    import re
    runs = _bare_runs(topic)
    pending: Any = collections.deque()
    emit = pending.append

    def prompt(inputs: Iterator[Dict[str, str]]) -> Iterator[List[Any]]:
        run = runs["prompt"]
        for x in inputs:
            emit(_event("on_prompt_start", run, {"input": x}))
            value = [("human", f"tell me a story about {x['topic']}")]
            emit(_event("on_prompt_end", run, {"output": value, "input": x}))
            yield value

    def model(prompts: Iterator[List[Any]]) -> Iterator[Chunk]:
        run = runs["chat_model"]
        for value in prompts:
            data = {"messages": [value]}
            emit(_event("on_chat_model_start", run, {"input": data}))
            outputs = []
            for part in re.split(r"(\s)", answer):
                chunk = Chunk(part, "run-1")
                outputs.append(part)
                emit(_event("on_chat_model_stream", run, {"chunk": chunk}))
                yield chunk
            whole = Chunk("".join(outputs), "run-1")
            emit(_event("on_chat_model_end", run, {"output": whole, "input": data}))

    def parser(chunks: Iterator[Chunk]) -> Iterator[str]:
        run, inputs = runs["parser"], []
        for chunk in chunks:
            if not inputs:
                emit(_event("on_parser_start", run, {}))
            inputs.append(chunk.content)
            emit(_event("on_parser_stream", run, {"chunk": chunk.content}))
            yield chunk.content
        text = "".join(inputs)
        emit(_event("on_parser_end", run, {"output": text, "input": Chunk(text, "run-1")}))

    run, outputs = runs["chain"], []
    emit(_event("on_chain_start", run, {"input": runs["input"]}))
    for out in parser(model(prompt(iter([runs["input"]])))):
        outputs.append(out)
        emit(_event("on_chain_stream", run, {"chunk": out}))
        while pending:
            yield pending.popleft()
    emit(_event("on_chain_end", run, {"output": "".join(outputs)}))
    while pending:
        yield pending.popleft()


async def bare_astream_events(topic: str, answer: str) -> AsyncIterator[Dict[str, Any]]:
    """`bare_stream_events` with async generators."""
    import collections
    import re
    runs = _bare_runs(topic)
    pending: Any = collections.deque()
    emit = pending.append

    async def prompt() -> AsyncIterator[List[Any]]:
        run, x = runs["prompt"], runs["input"]
        emit(_event("on_prompt_start", run, {"input": x}))
        value = [("human", f"tell me a story about {x['topic']}")]
        emit(_event("on_prompt_end", run, {"output": value, "input": x}))
        yield value

    async def model(prompts: AsyncIterator[List[Any]]) -> AsyncIterator[Chunk]:
        run = runs["chat_model"]
        async for value in prompts:
            data = {"messages": [value]}
            emit(_event("on_chat_model_start", run, {"input": data}))
            outputs = []
            for part in re.split(r"(\s)", answer):
                chunk = Chunk(part, "run-1")
                outputs.append(part)
                emit(_event("on_chat_model_stream", run, {"chunk": chunk}))
                yield chunk
            whole = Chunk("".join(outputs), "run-1")
            emit(_event("on_chat_model_end", run, {"output": whole, "input": data}))

    async def parser(chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        run, inputs = runs["parser"], []
        async for chunk in chunks:
            if not inputs:
                emit(_event("on_parser_start", run, {}))
            inputs.append(chunk.content)
            emit(_event("on_parser_stream", run, {"chunk": chunk.content}))
            yield chunk.content
        text = "".join(inputs)
        emit(_event("on_parser_end", run, {"output": text, "input": Chunk(text, "run-1")}))

    run, outputs = runs["chain"], []
    emit(_event("on_chain_start", run, {"input": runs["input"]}))
    async for out in parser(model(prompt())):
        outputs.append(out)
        emit(_event("on_chain_stream", run, {"chunk": out}))
        while pending:
            yield pending.popleft()
    emit(_event("on_chain_end", run, {"output": "".join(outputs)}))
    while pending:
        yield pending.popleft()


def timed(fn: Callable[[], int]) -> Dict[str, float]:
    start = time.perf_counter()
    count = fn()
    return {"seconds": time.perf_counter() - start, "count": count}


def work_stream(impl: str) -> Dict[str, Any]:
    answer = _answer()
    if impl == "bare":
        return timed(lambda: sum(1 for _ in bare_stream("x", answer)))
    chain = make_chain(lib(impl), iter([answer]))
    return timed(lambda: sum(1 for _ in chain.stream({"topic": "x"})))


def work_astream(impl: str) -> Dict[str, Any]:
    answer = _answer()
    chain = None if impl == "bare" else make_chain(lib(impl), iter([answer]))

    async def go() -> int:
        n = 0
        source = bare_astream("x", answer) if chain is None else chain.astream({"topic": "x"})
        async for _ in source:
            n += 1
        return n
    return timed(lambda: asyncio.run(go()))


def events_of(impl: str, answer: str, asynchronous: bool) -> Callable[[], Any]:
    """A function starting one run's events: `astream_events` / `stream_events` of the chain
    answering `answer`, or the bare pipeline's."""
    if impl == "bare":
        bare = bare_astream_events if asynchronous else bare_stream_events
        return lambda: bare("x", answer)
    chain = make_chain(lib(impl), iter([answer]))
    if asynchronous:
        return lambda: chain.astream_events({"topic": "x"}, version="v2")
    return lambda: chain.stream_events({"topic": "x"})


def work_astream_events(impl: str) -> Dict[str, Any]:
    start_events = events_of(impl, _answer(), True)

    async def go() -> int:
        n = 0
        async for _ in start_events():
            n += 1
        return n
    return timed(lambda: asyncio.run(go()))


def work_stream_events(impl: str) -> Dict[str, Any]:
    start_events = events_of(impl, _answer(), False)
    return timed(lambda: sum(1 for _ in start_events()))


def _first_event(impl: str, chunks: int, asynchronous: bool) -> Dict[str, Any]:
    """Seconds from starting the events of a `chunks`-chunk run to holding the first event,
    after a one-word warm-up run; then the consumer leaves (the close is not timed)."""
    warm, start_events = events_of(impl, "hello", asynchronous), events_of(impl, _answer(_words_for(chunks)), asynchronous)
    if asynchronous:
        async def go() -> float:
            async for _ in warm():
                pass
            start = time.perf_counter()
            events = start_events()
            await events.__anext__()
            seconds = time.perf_counter() - start
            await events.aclose()
            return seconds
        return {"seconds": asyncio.run(go()), "count": 1}
    for _ in warm():
        pass
    start = time.perf_counter()
    events = start_events()
    next(events)
    seconds = time.perf_counter() - start
    events.close()
    return {"seconds": seconds, "count": 1}


def work_first_astream_event(impl: str, chunks: int) -> Dict[str, Any]:
    return _first_event(impl, chunks, True)


def work_first_stream_event(impl: str, chunks: int) -> Dict[str, Any]:
    return _first_event(impl, chunks, False)


def _slow_memory(impl: str, chunks: int, asynchronous: bool) -> Dict[str, Any]:
    """tracemalloc's peak while a slow consumer (1 ms sleep every SLOW_EVERY events) takes
    every event of a `chunks`-chunk run. The answer string is built before tracing starts; the
    fake model's own work (its chunks) is traced, as a user would see it."""
    import tracemalloc
    start_events = events_of(impl, _answer(_words_for(chunks)), asynchronous)
    if asynchronous:
        async def go() -> int:
            n = 0
            async for _ in start_events():
                n += 1
                if n % SLOW_EVERY == 0:
                    await asyncio.sleep(SLOW_SLEEP)
            return n
        consume: Callable[[], int] = lambda: asyncio.run(go())
    else:
        def consume() -> int:
            n = 0
            for _ in start_events():
                n += 1
                if n % SLOW_EVERY == 0:
                    time.sleep(SLOW_SLEEP)
            return n
    tracemalloc.start()
    result = timed(consume)
    result["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result


def work_slow_astream_events(impl: str, chunks: int) -> Dict[str, Any]:
    return _slow_memory(impl, chunks, True)


def work_slow_stream_events(impl: str, chunks: int) -> Dict[str, Any]:
    return _slow_memory(impl, chunks, False)


def work_invoke(impl: str) -> Dict[str, Any]:
    import itertools
    calls = 2000
    if impl == "bare":
        return timed(lambda: sum(1 for _ in range(calls) for _ in ["".join(bare_stream("x", "hello"))]))
    chain = make_chain(lib(impl), itertools.repeat("hello"))
    chain.invoke({"topic": "warm-up"})
    return timed(lambda: sum(1 for _ in range(calls) if chain.invoke({"topic": "x"})))


def work_abatch(impl: str) -> Dict[str, Any]:
    import itertools
    inputs = [{"topic": f"t{i}"} for i in range(1000)]
    if impl == "bare":
        async def one(x: Dict[str, str], gate: asyncio.Semaphore) -> str:
            async with gate:
                return "".join([c async for c in bare_astream(x["topic"], "hello")])

        async def go() -> int:
            gate = asyncio.Semaphore(16)
            return len(await asyncio.gather(*(one(x, gate) for x in inputs)))
        return timed(lambda: asyncio.run(go()))
    chain = make_chain(lib(impl), itertools.repeat("hello"))
    return timed(lambda: len(asyncio.run(chain.abatch(inputs, {"max_concurrency": 16}))))


def work_json(impl: str, size: int) -> Dict[str, Any]:
    doc = json_doc(size)
    pieces = chunks_of(doc)
    expected = json.loads(doc)
    if impl == "bare":
        def run() -> Any:
            return bare_partial_json(iter(pieces))
    else:
        parser = lib(impl)["JsonOutputParser"]()

        def run() -> Any:
            last = None
            for last in parser.transform(iter(pieces)):
                pass
            return last
    start = time.perf_counter()
    final = run()
    seconds = time.perf_counter() - start
    assert final == expected, "the final object differs from json.loads(doc)"
    return {"seconds": seconds, "count": len(pieces), "bytes": len(doc)}


def work_json_shape(impl: str, spec: str) -> Dict[str, Any]:
    """One JSON shape at one size, in one mode: `spec` is "shape index/mode/size"."""
    index, mode, size = spec.split("/")
    pieces = list(json_shapes(int(size)).values())[int(index)]
    if impl == "bare":
        def run() -> Any:
            return bare_partial_json(iter(pieces))
    else:
        parser = lib(impl)["JsonOutputParser"](diff=mode == "diff")

        def run() -> Any:
            n = 0
            for _ in parser.transform(iter(pieces)):
                n += 1
            return n
    start = time.perf_counter()
    try:
        run()
    except Exception as exc:  # langchain_core: RecursionError past ~1,000 levels
        return {"seconds": time.perf_counter() - start, "count": len(pieces), "error": type(exc).__name__}
    return {"seconds": time.perf_counter() - start, "count": len(pieces)}


def work_memory(impl: str, chunks: int) -> Dict[str, Any]:
    """Peak traced memory of streaming a `chunks`-chunk answer through prompt | model | parser
    with no listener, with the library's own GenericFakeChatModel as a user would run it: the
    answer string is built before tracing starts, everything the fake and the chain allocate
    from it (the fake's chunks included) is traced."""
    import tracemalloc
    chain = make_chain(lib(impl), iter([_answer(_words_for(chunks))]))
    tracemalloc.start()
    n = sum(1 for _ in chain.stream({"topic": "x"}))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": 0.0, "count": n, "peak": peak}


def work_import(impl: str) -> Dict[str, Any]:
    code = {"minichain": f"import sys; sys.path.insert(0, {ROOT!r}); import minichain",
            "langchain_core": "import langchain_core.prompts, langchain_core.language_models, "
                              "langchain_core.output_parsers",
            "bare": "pass"}[impl]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)  # writes the .pyc
    best = []
    for _ in range(7):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        best.append(time.perf_counter() - start)
    return {"seconds": min(best), "count": 1}


WORKLOADS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "import": work_import, "stream": work_stream, "astream": work_astream,
    "astream_events": work_astream_events, "stream_events": work_stream_events,
    "invoke": work_invoke, "abatch": work_abatch, "json": work_json,
    "json_shape": work_json_shape, "memory": work_memory,
    "first_astream_event": work_first_astream_event, "first_stream_event": work_first_stream_event,
    "slow_astream_events": work_slow_astream_events, "slow_stream_events": work_slow_stream_events}
SECTIONS = ["import", "stream", "astream", "astream_events", "invoke", "stream_events", "abatch",
            "json", "json_shapes", "memory", "first_event", "slow_memory"]


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per measurement, medians, ratios, one table
# ---------------------------------------------------------------------------------------------

def measure(python: str, impl: str, workload: str, arg: Any = None, timeout: float = 600) -> Any:
    cmd = [python, os.path.abspath(__file__), "--worker", impl, workload]
    if arg is not None:
        cmd.append(str(arg))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{impl} {workload} failed:\n{exc.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(python: str, impl: str, workload: str, repeats: int, arg: Any = None,
           timeout: float = 600) -> Any:
    runs = [measure(python, impl, workload, arg, timeout) for _ in range(repeats)]
    if any(r is None for r in runs):
        return None
    return {"seconds": statistics.median(r["seconds"] for r in runs), "count": runs[0]["count"],
            **{k: v for k, v in runs[0].items() if k not in ("seconds", "count")}}


def find_langchain(given: str) -> str:
    for python in ([given] if given else []) + [sys.executable]:
        probe = subprocess.run([python, "-c", "import langchain_core; print(langchain_core.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return python
    return ""


def fmt(x: float, unit: str) -> str:
    return f"{x:.3g} {unit}"


def fmt_bytes(b: float) -> str:
    return f"{b / 1e3:.0f} KB" if b < 1e6 else f"{b / 1e6:.1f} MB"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x" if r >= 0.1 else f"{r:.2g}x"


def size_label(chunks: int) -> str:
    return f"{chunks // 1000}k" if chunks % 1000 == 0 else str(chunks)


def json_shape_rows(rows: List[List[str]], me: str, lc: str, repeats: int) -> None:
    """Each JSON shape, in each mode: the time at the larger size and the growth exponent."""
    small, large = JSON_SHAPE_SIZES

    def cell(results: List[Any]) -> str:
        if any(r is None for r in results):  # (a langchain_core run that timed out)
            return f"over budget ({LC_SHAPE_BUDGET:g} s)"
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            return f"fails: {failed[0]}"
        times = [r["seconds"] for r in results]
        growth = math.log(max(times[1], 1e-9) / max(times[0], 1e-9)) / math.log(large / small)
        return f"{fmt(times[1], 's')}, exponent {growth:.2f}"
    bare_done: Dict[int, str] = {}
    for index, shape in enumerate(json_shapes(100)):
        for mode in ("snapshots", "diff"):
            spec = f"{index}/{mode}/"
            mine = [median(me, "minichain", "json_shape", repeats, spec + str(n)) for n in (small, large)]
            theirs = "n/a"
            if lc:
                runs = [median(lc, "langchain_core", "json_shape", 1, spec + str(small), timeout=LC_SHAPE_BUDGET)]
                if runs[0] is not None and "error" not in runs[0]:  # else the larger one is no better
                    runs.append(median(lc, "langchain_core", "json_shape", 1, spec + str(large),
                                       timeout=LC_SHAPE_BUDGET))
                theirs = cell(runs)
            if index not in bare_done:  # the floor does not depend on the mode
                bare = [median(me, "bare", "json_shape", repeats, spec + str(n)) for n in (small, large)]
                bare_done[index] = cell(bare)
            rows.append([f"JSON {shape}, {mode}, {small // 1000}k vs {large // 1000}k chars",
                         cell(mine), theirs, bare_done[index]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lc-python", default="", help="an interpreter with langchain-core 1.7.2")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and JSON sizes")
    ap.add_argument("--only", default="", metavar="SECTION,...",
                    help="run only these sections: " + ", ".join(SECTIONS))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, workload, *rest = args.worker
        arg = (int(rest[0]) if rest[0].isdigit() else rest[0]) if rest else None
        result = WORKLOADS[workload](impl, arg) if arg is not None else WORKLOADS[workload](impl)
        print(json.dumps(result))
        return
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")

    def wanted(section: str) -> bool:
        return not only or section in only
    repeats = 2 if args.quick else args.repeats
    sizes = JSON_SIZES[:4] if args.quick else JSON_SIZES
    lc = find_langchain(args.lc_python)
    me = sys.executable
    print(f"Python {sys.version.split()[0]} on {os.cpu_count()} cores; {repeats} repeats, medians.")
    print("langchain_core: " + (f"measured with {lc}" if lc else
          "not installed: skipped (pip install 'langchain-core==1.7.2' in a venv, then --lc-python)"))
    rows: List[List[str]] = []

    def row(name: str, unit: str, scale: float, per: bool, results: Dict[str, Any]) -> None:
        def value(r: Any) -> float:
            return r["seconds"] * scale / (r["count"] if per else 1)
        mc = value(results["minichain"])
        cells = [name, fmt(mc, unit)]
        lc_result, bare_result = results.get("langchain_core"), results.get("bare")
        # langchain_core: how many times slower than minichain; bare: minichain's cost in bares
        cells.append("n/a" if lc_result is None else f"{fmt(value(lc_result), unit)} ({fmt_ratio(value(lc_result) / mc)})")
        cells.append("n/a" if bare_result is None else f"{fmt(value(bare_result), unit)} ({fmt_ratio(mc / value(bare_result))})")
        rows.append(cells)

    def events_per_run(results: Dict[str, Any]) -> None:
        counts = [f"{impl} {r['count']}" for impl, r in results.items() if r is not None]
        rows.append(["  events per run", ", ".join(counts), "", ""])
        bare, mine = results.get("bare"), results["minichain"]
        if bare is not None and bare["count"] != mine["count"]:
            raise SystemExit(f"bare yields {bare['count']} events, minichain {mine['count']}")

    if wanted("import"):
        imports = {impl: median(py, impl, "import", 1) for impl, py in (("minichain", me), ("bare", me))}
        if lc:
            imports["langchain_core"] = median(lc, "langchain_core", "import", 1)
        base = imports["bare"]["seconds"]
        for impl in imports:
            if imports[impl] is not None and impl != "bare":
                imports[impl] = {"seconds": max(imports[impl]["seconds"] - base, 1e-6), "count": 1}
        imports["bare"] = None
        row("import (minus `python -c pass`)", "ms", 1e3, False, imports)

    for workload, unit in (("stream", "us/chunk"), ("astream", "us/chunk"),
                           ("astream_events", "us/event"), ("invoke", "us/call")):
        if not wanted(workload):
            continue
        results = {"minichain": median(me, "minichain", workload, repeats)}
        if lc:
            results["langchain_core"] = median(lc, "langchain_core", workload, repeats)
        results["bare"] = median(me, "bare", workload, repeats)
        row(workload, unit, 1e6, True, results)
        if workload == "astream_events":
            events_per_run(results)
    if wanted("stream_events"):
        results = {"minichain": median(me, "minichain", "stream_events", repeats),
                   "bare": median(me, "bare", "stream_events", repeats)}
        row("stream_events (sync; langchain_core has none)", "us/event", 1e6, True, results)
        events_per_run(results)
    if wanted("abatch"):
        results = {"minichain": median(me, "minichain", "abatch", repeats), "bare": median(me, "bare", "abatch", repeats)}
        if lc:
            results["langchain_core"] = median(lc, "langchain_core", "abatch", repeats)
        row("abatch 1,000 inputs, max_concurrency=16", "ms", 1e3, False, results)

    json_times: Dict[str, List[float]] = {"minichain": [], "bare": [], "langchain_core": []}
    lc_over = False
    for size in sizes if wanted("json") else []:
        results = {"minichain": median(me, "minichain", "json", repeats, size),
                   "bare": median(me, "bare", "json", repeats, size)}
        if lc and not lc_over:
            previous = json_times["langchain_core"][-1] if json_times["langchain_core"] else 0
            if previous * 16 > LC_JSON_BUDGET:  # quadratic: 4x the size costs ~16x the time
                lc_over = True
            else:
                results["langchain_core"] = median(lc, "langchain_core", "json", 1, size)
        for impl, r in results.items():
            if r is not None:
                json_times[impl].append(r["seconds"])
        label = f"JSON {results['minichain']['bytes'] / 1000:g} KB in 4-char chunks"
        row(label, "s", 1, False, results)
        if lc and lc_over and "langchain_core" not in results:
            rows[-1][2] = f"over budget ({LC_JSON_BUDGET:g} s)"

    def exponent(times: List[float]) -> str:
        if len(times) < 2:
            return "n/a"
        xs = [math.log(s) for s in sizes[:len(times)]]
        ys = [math.log(t) for t in times]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return f"{slope:.2f}"
    if wanted("json"):
        rows.append(["JSON scaling exponent (fit)", exponent(json_times["minichain"]),
                     exponent(json_times["langchain_core"]) if lc else "n/a", exponent(json_times["bare"])])

    if wanted("json_shapes"):
        json_shape_rows(rows, me, lc, repeats)

    low, high = EVENT_CHUNKS[0], EVENT_CHUNKS[-1]
    vs = f"{size_label(low)} vs {size_label(high)} chunks"
    if wanted("memory"):
        small, large = (measure(me, "minichain", "memory", n) for n in (low, high))
        rows.append([f"peak memory, {vs}, no listener",
                     f"{fmt_bytes(small['peak'])} vs {fmt_bytes(large['peak'])}", "", ""])

    if wanted("first_event"):
        for workload, label in (("first_astream_event", "astream_events"),
                                ("first_stream_event", "stream_events")):
            for chunks in EVENT_CHUNKS:
                n = repeats if chunks <= 20_000 else min(repeats, 3)
                results = {"minichain": median(me, "minichain", workload, n, chunks),
                           "bare": median(me, "bare", workload, n, chunks)}
                if lc and workload == "first_astream_event":
                    results["langchain_core"] = median(lc, "langchain_core", workload, n, chunks,
                                                       timeout=LC_FIRST_EVENT_BUDGET)
                row(f"time to first event, {label}, {size_label(chunks)} chunks", "ms", 1e3, False, results)
                if lc and workload == "first_astream_event" and results["langchain_core"] is None:
                    rows[-1][2] = f"over budget ({LC_FIRST_EVENT_BUDGET:g} s)"

    if wanted("slow_memory"):
        for workload, label in (("slow_astream_events", "astream_events"),
                                ("slow_stream_events", "stream_events")):
            mine = [measure(me, "minichain", workload, n) for n in EVENT_CHUNKS]
            bare = [measure(me, "bare", workload, n) for n in EVENT_CHUNKS]
            rows.append([f"peak memory, {vs}, slow consumer, {label}",
                         " vs ".join(fmt_bytes(r["peak"]) for r in mine), "",
                         " vs ".join(fmt_bytes(r["peak"]) for r in bare)])
            rows.append(["  run time under tracemalloc",
                         " vs ".join(f"{r['seconds']:.3g} s" for r in mine), "",
                         " vs ".join(f"{r['seconds']:.3g} s" for r in bare)])

    header = ["workload", "minichain", "langchain_core (x slower)", "bare (minichain = x bare)"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
