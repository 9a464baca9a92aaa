"""Benchmark: minichain against langchain_core and against bare generators.

Each implementation runs in its own subprocess, on the same inputs, several times; the table
shows medians and ratios (ratios are what to read on a noisy machine). Implementations:

- minichain (this repository);
- langchain_core, when an interpreter that has it is given (`--lc-python PATH`, or it is
  importable here): `pip install 'langchain-core==1.7.2'` in a separate virtualenv;
- bare: hand-written generators and async generators doing the same work with no framework,
  the floor to compare against. For JSON, "bare" drives minichain's push parser from a plain
  loop, so the ratio is the cost of the Runnable around it.

Run from the repository root:  python examples/benchmark.py [--lc-python /path/to/python]
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
JSON_SIZES = [1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000]
LC_JSON_BUDGET = 150.0  # seconds langchain_core may spend on one JSON size


# ---------------------------------------------------------------------------------------------
# Workers: run inside a subprocess, print one JSON line of measurements
# ---------------------------------------------------------------------------------------------

def _answer() -> str:
    return " ".join(f"word{i % 97}" for i in range(WORDS))


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


def work_astream_events(impl: str) -> Dict[str, Any]:
    chain = make_chain(lib(impl), iter([_answer()]))

    async def go() -> int:
        n = 0
        async for _ in chain.astream_events({"topic": "x"}, version="v2"):
            n += 1
        return n
    return timed(lambda: asyncio.run(go()))


def work_stream_events(impl: str) -> Dict[str, Any]:
    chain = make_chain(lib(impl), iter([_answer()]))
    return timed(lambda: sum(1 for _ in chain.stream_events({"topic": "x"})))


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
        sys.path.insert(0, ROOT)
        import minichain as m

        def run() -> Any:
            state, last = m._JsonStream(), None
            for piece in pieces:
                if state.feed(piece):
                    last = state.snapshot()
            return last
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


def work_memory(impl: str, chunks: int) -> Dict[str, Any]:
    """Peak traced memory of streaming `chunks` tokens through prompt | model | parser with no
    listener. The model yields tokens lazily, so any growth is the framework's."""
    import tracemalloc
    m = lib(impl)

    class Counting(m["BaseChatModel"]):  # type: ignore[misc, valid-type]
        def _stream(self, messages: Any, **kwargs: Any) -> Iterator[Any]:
            for i in range(chunks):
                yield m["AIMessageChunk"]("tok ")
    chain = m["ChatPromptTemplate"].from_template("{topic}") | Counting() | m["StrOutputParser"]()
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
    "invoke": work_invoke, "abatch": work_abatch, "json": work_json, "memory": work_memory}


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


def median(python: str, impl: str, workload: str, repeats: int, arg: Any = None) -> Any:
    runs = [measure(python, impl, workload, arg) for _ in range(repeats)]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lc-python", default="", help="an interpreter with langchain-core 1.7.2")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and JSON sizes")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, workload, *rest = args.worker
        arg = int(rest[0]) if rest else None
        result = WORKLOADS[workload](impl, arg) if arg is not None else WORKLOADS[workload](impl)
        print(json.dumps(result))
        return
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
        cells.append("n/a" if lc_result is None else f"{fmt(value(lc_result), unit)} ({value(lc_result) / mc:.1f}x)")
        cells.append("n/a" if bare_result is None else f"{fmt(value(bare_result), unit)} ({mc / value(bare_result):.1f}x)")
        rows.append(cells)

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
        results = {"minichain": median(me, "minichain", workload, repeats)}
        if lc:
            results["langchain_core"] = median(lc, "langchain_core", workload, repeats)
        if workload != "astream_events":
            results["bare"] = median(me, "bare", workload, repeats)
        row(workload, unit, 1e6, True, results)
        if workload == "astream_events":
            counts = [f"minichain {results['minichain']['count']}"]
            if lc:
                counts.append(f"langchain_core {results['langchain_core']['count']}")
            rows.append(["  events per run", ", ".join(counts), "", ""])
    sync_events = median(me, "minichain", "stream_events", repeats)
    row("stream_events (sync; minichain only)", "us/event", 1e6, True, {"minichain": sync_events})
    results = {"minichain": median(me, "minichain", "abatch", repeats), "bare": median(me, "bare", "abatch", repeats)}
    if lc:
        results["langchain_core"] = median(lc, "langchain_core", "abatch", repeats)
    row("abatch 1,000 inputs, max_concurrency=16", "ms", 1e3, False, results)

    json_times: Dict[str, List[float]] = {"minichain": [], "bare": [], "langchain_core": []}
    lc_over = False
    for size in sizes:
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
    rows.append(["JSON scaling exponent (fit)", exponent(json_times["minichain"]),
                 exponent(json_times["langchain_core"]) if lc else "n/a", exponent(json_times["bare"])])

    small, large = (measure(me, "minichain", "memory", n) for n in (100_000, 1_000_000))
    rows.append(["peak memory, 100k vs 1M chunks, no listener",
                 f"{small['peak'] / 1e3:.0f} KB vs {large['peak'] / 1e3:.0f} KB", "", ""])

    widths = [max(len(r[i]) for r in rows + [["workload", "minichain", "langchain_core (x slower)", "bare (minichain = x bare)"]]) for i in range(4)]
    header = ["workload", "minichain", "langchain_core (x slower)", "bare (minichain = x bare)"]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
