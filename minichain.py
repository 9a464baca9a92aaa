# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the minichain authors
# minichain.py: https://github.com/minichain-dev/minichain (one file; copy it into your project)
"""minichain: LangChain's Runnable streaming interface in one file.

Standard library only, Python >= 3.9, one file to read in order: the core that teaches
streaming (sections 1 to 8) first, then the batteries. Code written for langchain_core's
streaming guide ("How to stream runnables") runs here with only its imports changed, with
the same chunks, the same events and the same names.

The whole design is four identities::

    stream(x)         = transform(iter([x]))
    invoke(x)         = the `+`-fold of stream(x)
    batch(xs)         = [invoke(x) for x in xs], run concurrently
    astream_events(x) = astream(x) with a listener attached

A runnable is a generator transform from input chunks to output chunks; a step that cannot
work chunk by chunk folds its input with `+` first, and that is exactly where streaming stops.

>>> prompt = ChatPromptTemplate.from_template("tell me a joke about {topic}")
>>> model = GenericFakeChatModel(messages=iter(["Why did the parrot talk?"]))
>>> chain = prompt | model | StrOutputParser()
>>> [chunk for chunk in chain.stream({"topic": "parrot"})]
['Why', ' ', 'did', ' ', 'the', ' ', 'parrot', ' ', 'talk?']

Sections (each relies only on the ones above it, but where a comment says why not):
  1. Messages and documents
  2. Config, runs, events and the fold
  3. The Runnable protocol: transform, stream, invoke, batch
  4. Composition: sequence, parallel, lambda, generator, passthrough, assign, @chain
  5. Event streaming: astream_events, stream_events, custom events, astream_log
  6. Prompts: values and templates
  7. Chat models, LLMs and fakes
  8. Output parsers: str and incremental JSON
 The batteries:
  9. Past the guide: fallbacks, retry, branch, pick, list parsers, fakes that list
 10. LangChain-style callback handlers and run listeners
 11. Retrieval
 12. Tools
 13. Model servers over HTTP: OpenAI-compatible, Ollama, Anthropic
 14. Server-sent events out: streaming a run to a browser
 15. Remote runnables: LangServe's protocol, from both ends
 16. Demo (`python -m minichain`)
 Appendices (plumbing a reader can skip):
  A. The incremental JSON parser
  B. Modules imported on first use
"""
from __future__ import annotations

import contextvars
import itertools
import os
import re
import threading
import time
from typing import (
    TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Dict, Generic, Iterable, Iterator, List,
    Deque, Mapping, Optional, Sequence, Tuple, Type, TypedDict, TypeVar, Union, cast,
)


# asyncio, inspect and json are imported on first use (`_LazyModule`, appendix B):
# code that never awaits should not pay asyncio's ~25 ms import.

__version__ = "0.1.0"

__all__ = [
    # 1. messages and documents
    "BaseMessage", "SystemMessage", "HumanMessage", "AIMessage", "AIMessageChunk", "ToolMessage",
    "ChatMessage", "HumanMessageChunk", "SystemMessageChunk", "ToolMessageChunk", "ChatMessageChunk",
    "merge_content", "Document", "AddableDict",
    # 2-3. config, runs and the protocol
    "RunnableConfig", "ensure_config", "Run", "Runnable",
    # 4. composition
    "RunnableSequence", "RunnableParallel", "RunnableLambda", "RunnableGenerator",
    "RunnablePassthrough", "RunnableAssign", "RunnableBinding", "chain", "coerce_to_runnable",
    # 5. events
    "dispatch_custom_event", "adispatch_custom_event", "RunLogPatch", "RunLog",
    # 6. prompts
    "PromptValue", "StringPromptValue", "ChatPromptValue", "PromptTemplate", "ChatPromptTemplate",
    "MessagesPlaceholder", "SystemMessagePromptTemplate", "HumanMessagePromptTemplate",
    "AIMessagePromptTemplate",
    # 7. models
    "BaseChatModel", "BaseLLM", "GenericFakeChatModel", "FakeListChatModel",
    "FakeListChatModelError",
    # 8. parsers
    "OutputParserException", "BaseOutputParser", "StrOutputParser", "JsonOutputParser",
    "parse_partial_json", "parse_json_markdown",
    # 9. past the guide
    "RunnablePick", "RunnableWithFallbacks", "RunnableRetry", "RunnableBranch",
    "CommaSeparatedListOutputParser", "NumberedListOutputParser", "MarkdownListOutputParser",
    "FakeListLLM", "FakeStreamingListLLM", "FakeListLLMError",
    # 10. callback handlers and run listeners
    "BaseCallbackHandler", "AsyncCallbackHandler", "StdOutCallbackHandler",
    "StreamingStdOutCallbackHandler", "LLMResult", "Generation", "GenerationChunk", "ChatGeneration",
    "ChatGenerationChunk", "RunTree",
    # 11. retrieval
    "BaseRetriever", "LexicalEmbeddings", "InMemoryVectorStore", "VectorStoreRetriever",
    # 12. tools
    "BaseTool", "tool", "ToolException",
    # 13. model servers
    "ChatOpenAI", "ChatOllama", "ChatAnthropic", "APIError", "APITimeoutError", "APIConnectionError",
    "IncompleteStreamError", "demo_model",
    # 14. server-sent events
    "to_sse", "ato_sse", "read_sse",
    # 15. remote runnables
    "RemoteRunnable", "asgi_app", "MAX_BODY_BYTES",
]

T = TypeVar("T")
Input = TypeVar("Input")
Output = TypeVar("Output")


def _short(value: Any, limit: int = 80) -> str:
    """The repr of `value`, cut to `limit` characters for error messages (a long string or
    bytes is cut before it is repr'd: an error never formats more than it prints)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
        return repr(value)[: limit - 3] + "..."
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ==============================================================================================
# 1. Messages and documents
#
# Plain classes with readable reprs. `AIMessageChunk + AIMessageChunk` is how a streamed answer
# becomes one message; `AddableDict` is how a parallel step's one-key chunks become one dict.
# ==============================================================================================

# deviation: names and ids take the newer value, so merging is associative (langchain_core's
# merge_dicts concatenates such strings, and raises on some)
_ATOMIC_KEYS = frozenset({"id", "index", "type", "created", "model", "model_name",
                          "finish_reason", "stop_reason", "done_reason", "system_fingerprint"})


def _merge_dicts(left: Dict[str, Any], right: Dict[str, Any]) -> Dict[str, Any]:
    """Merge metadata dicts of two chunks: strings concatenate, dicts merge, lists extend;
    names and ids (`model_name`, `finish_reason`...) and other values take the newer value.
    The merge is associative, so chunks add up the same however they are grouped.

    >>> _merge_dicts({"a": "x", "n": {"p": 1}, "model_name": "m"}, {"a": "y", "n": {"q": 2}, "model_name": "m"})
    {'a': 'xy', 'n': {'p': 1, 'q': 2}, 'model_name': 'm'}
    """
    merged = dict(left)
    for key, value in right.items():
        old = merged.get(key)
        if value is None:
            merged.setdefault(key, None)
        elif old is None:
            merged[key] = value
        elif isinstance(old, str) and isinstance(value, str) and key not in _ATOMIC_KEYS:
            merged[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = _merge_dicts(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + value
        else:
            merged[key] = value
    return merged


class BaseMessage:
    """One message of a conversation: `content` plus metadata.

    Messages compare by value and print like langchain_core's, leaving out empty fields.

    >>> HumanMessage("hi") == HumanMessage(content="hi")
    True
    >>> SystemMessage("be brief")
    SystemMessage(content='be brief')
    """

    type = "base"
    _fields: Tuple[str, ...] = ("content", "additional_kwargs", "response_metadata", "name", "id")
    __slots__ = _fields  # messages are made per token: slots make them cheap

    def __init__(self, content: Any = "", *, additional_kwargs: Optional[Dict[str, Any]] = None,
                 response_metadata: Optional[Dict[str, Any]] = None, name: Optional[str] = None,
                 id: Optional[str] = None, **kwargs: Any) -> None:
        if content.__class__ is not str and not isinstance(content, list):
            raise TypeError(f"{type(self).__name__} content must be a str or a list of content "
                            f"blocks, not {type(content).__name__}: {_short(content)}")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments "
                            f"{sorted(kwargs)}; it accepts {list(self._fields)}")
        self.content = content
        self.additional_kwargs = additional_kwargs or {}
        self.response_metadata = response_metadata or {}
        self.name = name
        self.id = id

    @property
    def text(self) -> str:
        """The text of the content: the string itself, or the text blocks joined.

        >>> AIMessage(["a", {"type": "text", "text": "b"}, {"type": "image"}]).text
        'ab'
        """
        if isinstance(self.content, str):
            return self.content
        return "".join(b if isinstance(b, str) else b.get("text", "") for b in self.content
                       if isinstance(b, str) or b.get("type") == "text")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def __repr__(self) -> str:
        # deviation: empty fields are left out, as the guide prints them (langchain_core: all)
        parts = [f"content={self.content!r}"]
        for field in self._fields[1:]:
            value = getattr(self, field)
            if value or (field == "tool_call_id" and value is not None):
                parts.append(f"{field}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class SystemMessage(BaseMessage):
    """A system instruction.

    >>> SystemMessage("You are terse.").type
    'system'
    """
    type = "system"
    __slots__ = ()


class HumanMessage(BaseMessage):
    """A message from the user.

    >>> HumanMessage("hello").content
    'hello'
    """
    type = "human"
    __slots__ = ()


class AIMessage(BaseMessage):
    """A model's answer; `tool_calls` holds parsed tool calls, `usage_metadata` token counts.

    >>> AIMessage("hi", usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4})
    AIMessage(content='hi', usage_metadata={'input_tokens': 3, 'output_tokens': 1, 'total_tokens': 4})
    """
    type = "ai"
    _fields = BaseMessage._fields + ("tool_calls", "invalid_tool_calls", "usage_metadata")
    __slots__ = ("tool_calls", "invalid_tool_calls", "usage_metadata")

    def __init__(self, content: Any = "", *, tool_calls: Optional[List[Dict[str, Any]]] = None,
                 invalid_tool_calls: Optional[List[Dict[str, Any]]] = None,
                 usage_metadata: Optional[Dict[str, int]] = None, **kwargs: Any) -> None:
        BaseMessage.__init__(self, content, **kwargs)
        self.tool_calls = [dict(c, type="tool_call") for c in tool_calls] if tool_calls else []
        self.invalid_tool_calls = list(invalid_tool_calls) if invalid_tool_calls else []
        self.usage_metadata = usage_metadata


def _add_usage(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Token usage of two chunks: counts add up; None means "the server did not say"."""
    if a is None or b is None:
        return a if b is None else b
    out = dict(a)
    for key, value in b.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _add_usage(old, value)
        elif isinstance(old, (int, float)) and isinstance(value, (int, float)):
            out[key] = old + value
        else:
            out[key] = value
    return out


def _pick_id(a: Optional[str], b: Optional[str]) -> Optional[str]:
    """The id of a sum of chunks: a provider's id beats minichain's `lc_run--` one."""
    if not a or not b:
        return a or b
    if a.startswith("lc_") and not b.startswith("lc_"):
        return b
    return a


def _merge_tool_call_chunks(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Tool-call fragments merged by `index`: `args` strings concatenate, id and name are set once."""
    merged = [dict(c) for c in a]
    for piece in b:
        same = [c for c in merged if piece.get("index") is not None
                and c.get("index") == piece.get("index")]
        if not same:
            merged.append(dict(piece))
            continue
        into = same[0]
        into["args"] = (into.get("args") or "") + (piece.get("args") or "")
        for key in ("id", "name"):
            if not into.get(key):
                into[key] = piece.get(key)
    return merged


def _parse_tool_call_chunks(chunks: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Split tool-call fragments into parsed `tool_calls` and `invalid_tool_calls`."""
    calls, invalid = [], []
    for c in chunks:
        text = c.get("args") or ""
        try:
            args = parse_partial_json(text) if text else {}  # the JSON parser of section 8
        except ValueError:
            args = None
        if isinstance(args, dict):
            calls.append({"name": c.get("name") or "", "args": args, "id": c.get("id"),
                          "type": "tool_call"})
        else:
            invalid.append({"name": c.get("name"), "args": text, "id": c.get("id"),
                            "error": None, "type": "invalid_tool_call"})
    return calls, invalid


def _plain_text(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and block.keys() == {"type", "text"}


def _as_blocks(content: Any) -> List[Any]:
    """Content as a list of blocks (a string becomes one text block)."""
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def merge_content(first: Any, *others: Any) -> Any:
    """Message contents added up, as chunks add them: strings concatenate; otherwise the
    result is a list of content blocks in which adjacent plain text joins and a block streamed
    in pieces under one `"index"` (Anthropic, OpenAI's Responses API) merges into one,
    keeping its first piece's `"type"`. One pass over the pieces; associative.

    >>> merge_content("Hel", "lo")
    'Hello'
    >>> merge_content([{"type": "text", "text": "Hel", "index": 0}], [{"type": "text", "text": "lo", "index": 0}])
    [{'type': 'text', 'text': 'Hello', 'index': 0}]
    >>> merge_content("a", ["b"], [{"type": "image", "url": "u"}])
    [{'type': 'text', 'text': 'ab'}, {'type': 'image', 'url': 'u'}]
    """
    texts = (first,) + others
    if all(t.__class__ is str for t in texts):
        return "".join(texts)
    # deviation: strings in a list become text blocks and adjacent text joins (langchain_core
    # keeps strings as they come: merge_content("a", ["b"]) is ['a', 'b'] there), so that
    # adding is associative and text reads the same however the chunks were grouped
    content: List[Any] = []
    indexed: Dict[Any, int] = {}  # a streamed block's `index` -> its place in `content`
    for block in (b for t in texts for b in _as_blocks(t)):
        if isinstance(block, str):
            block = {"type": "text", "text": block}
        if isinstance(block, dict) and block.get("index") in indexed:
            # a later piece of a block: merged into it, keeping the first piece's type
            at = indexed[block["index"]]
            content[at] = _merge_dicts(content[at], {k: v for k, v in block.items()
                                                     if k not in ("type", "index")})
            continue
        if content and _plain_text(block) and _plain_text(content[-1]):
            block = {"type": "text", "text": content.pop()["text"] + block["text"]}
        if isinstance(block, dict) and block.get("index") is not None:
            indexed[block["index"]] = len(content)
        content.append(block)
    return content


class AIMessageChunk(AIMessage):
    """A piece of a streamed answer; chunks add up with `+`.

    Content concatenates, metadata merges, usage adds up, tool-call fragments merge by index,
    and the id survives (a provider's id wins over minichain's `lc_run--` one).

    >>> a = AIMessageChunk("Hel", id="lc_run--1")
    >>> b = AIMessageChunk("lo", tool_call_chunks=[{"name": "f", "args": '{"x": ', "id": "c1", "index": 0}])
    >>> c = AIMessageChunk("!", tool_call_chunks=[{"name": None, "args": "1}", "id": None, "index": 0}])
    >>> total = a + b + c
    >>> total.content, total.id, total.tool_calls
    ('Hello!', 'lc_run--1', [{'name': 'f', 'args': {'x': 1}, 'id': 'c1', 'type': 'tool_call'}])
    """
    _fields = AIMessage._fields + ("tool_call_chunks", "chunk_position")
    __slots__ = ("tool_call_chunks", "chunk_position")

    def __init__(self, content: Any = "", *, tool_call_chunks: Optional[List[Dict[str, Any]]] = None,
                 chunk_position: Optional[str] = None, id: Optional[str] = None,
                 **kwargs: Any) -> None:
        if kwargs:
            AIMessage.__init__(self, content, id=id, **kwargs)
        else:  # the per-token case (content and id only): set the fields directly
            if content.__class__ is not str and not isinstance(content, list):
                AIMessage.__init__(self, content)  # raises the TypeError
            self.content, self.id, self.name, self.usage_metadata = content, id, None, None
            self.additional_kwargs, self.response_metadata = {}, {}
            self.tool_calls, self.invalid_tool_calls = [], []
        self.chunk_position = chunk_position
        if tool_call_chunks:
            self.tool_call_chunks = [dict(c, type="tool_call_chunk") for c in tool_call_chunks]
            if not self.tool_calls:
                self.tool_calls, self.invalid_tool_calls = _parse_tool_call_chunks(self.tool_call_chunks)
        else:
            self.tool_call_chunks = []

    def __add__(self, other: Any) -> "AIMessageChunk":
        if not isinstance(other, AIMessageChunk):
            if isinstance(other, _CHUNKS):  # another kind of chunk: its content and metadata
                other = AIMessageChunk(other.content, additional_kwargs=other.additional_kwargs,
                                       response_metadata=other.response_metadata)
            elif isinstance(other, BaseMessage):
                raise TypeError(f"cannot add {type(other).__name__} to AIMessageChunk: only "
                                "chunks add up; convert whole messages before joining them")
            else:
                return NotImplemented
        return AIMessageChunk.join([self, other])

    @staticmethod
    def join(chunks: Sequence["AIMessageChunk"]) -> "AIMessageChunk":
        """The sum of many chunks in one pass: `join([a, b, c])` equals `a + b + c`, at a cost
        linear in their total size (adding them one by one copies the text each time).

        >>> AIMessageChunk.join([AIMessageChunk("a", id="x"), AIMessageChunk("b"), AIMessageChunk("c")])
        AIMessageChunk(content='abc', id='x')

        Content blocks streamed in pieces under one `index` merge into one block:

        >>> AIMessageChunk.join([AIMessageChunk([{"type": "text", "text": "Hel", "index": 0}]),
        ...                      AIMessageChunk([{"type": "text", "text": "lo", "index": 0}])]).content
        [{'type': 'text', 'text': 'Hello', 'index': 0}]
        """
        content = merge_content(*[c.content for c in chunks])
        first = chunks[0]
        kwargs, meta, calls = first.additional_kwargs, first.response_metadata, first.tool_call_chunks
        usage, id_, name = first.usage_metadata, first.id, first.name
        last = first.chunk_position == "last"
        for c in chunks[1:]:
            if c.additional_kwargs:
                kwargs = _merge_dicts(kwargs, c.additional_kwargs)
            if c.response_metadata:
                meta = _merge_dicts(meta, c.response_metadata)
            if c.tool_call_chunks:
                calls = _merge_tool_call_chunks(calls, c.tool_call_chunks)
            if c.usage_metadata is not None:
                usage = _add_usage(usage, c.usage_metadata)
            if c.id is not None and c.id != id_:
                id_ = _pick_id(id_, c.id)
            name = name or c.name
            last = last or c.chunk_position == "last"
        return AIMessageChunk(content, additional_kwargs=dict(kwargs), response_metadata=dict(meta),
                              tool_call_chunks=calls, usage_metadata=usage, id=id_, name=name,
                              chunk_position="last" if last else None)

    def to_message(self) -> AIMessage:
        """The finished `AIMessage` this chunk adds up to.

        >>> (AIMessageChunk("a", id="x") + AIMessageChunk("b")).to_message()
        AIMessage(content='ab', id='x')
        """
        return AIMessage(self.content, additional_kwargs=self.additional_kwargs,
                         response_metadata=self.response_metadata, name=self.name, id=self.id,
                         tool_calls=self.tool_calls, invalid_tool_calls=self.invalid_tool_calls,
                         usage_metadata=self.usage_metadata)


class ToolMessage(BaseMessage):
    """A tool's result, sent back to the model under the id of the call it answers.

    >>> ToolMessage("42", tool_call_id="call_1")
    ToolMessage(content='42', tool_call_id='call_1')
    """
    type = "tool"
    _fields = BaseMessage._fields + ("tool_call_id",)
    __slots__ = ("tool_call_id",)

    def __init__(self, content: Any = "", *, tool_call_id: str, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.tool_call_id = tool_call_id


class ChatMessage(BaseMessage):
    """A message with any `role`, for roles beyond system, human, ai and tool.

    >>> ChatMessage("Looks good.", role="critic")
    ChatMessage(content='Looks good.', role='critic')
    """
    type = "chat"
    _fields = BaseMessage._fields + ("role",)
    __slots__ = ("role",)

    def __init__(self, content: Any = "", *, role: str, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.role = role


def _add_chunks(self: BaseMessage, other: Any) -> Any:
    """`a + b` for human, system, tool and chat chunks, as langchain_core's `BaseMessageChunk`:
    contents merge (`merge_content`), metadata merges, and the sum keeps the left chunk's class,
    id and own fields (`tool_call_id`, `role`), which must agree between chunks of one class.
    `a + [b, c]` adds several at once."""
    others = other if isinstance(other, list) else [other]
    if not all(isinstance(o, _CHUNKS) for o in others):
        fix = f" (make the whole message a chunk first: {type(self).__name__}(message.content))" \
            if isinstance(other, BaseMessage) else ""
        raise TypeError(f'unsupported operand type(s) for +: "{type(self).__name__}" and '
                        f'"{type(other).__name__}"; only message chunks add up{fix}')
    own = {f: getattr(self, f) for f in self._fields[len(BaseMessage._fields):]}  # tool_call_id, role
    for o in others:
        # deviation: a chunk of another class keeps the left one's own fields (langchain_core
        # raises KeyError for a ToolMessageChunk plus another kind of chunk)
        for field, value in own.items():
            if type(o) is type(self) and getattr(o, field) != value:
                raise ValueError(
                    f"Cannot concatenate {type(self).__name__}s with different "
                    f"{'roles' if field == 'role' else 'names'}. ({field} {value!r} and "
                    f"{getattr(o, field)!r}: only chunks of one message add up)")
    kwargs, meta, name = dict(self.additional_kwargs), dict(self.response_metadata), self.name
    for o in others:
        kwargs, meta = _merge_dicts(kwargs, o.additional_kwargs), _merge_dicts(meta, o.response_metadata)
        name = name or o.name  # deviation: the name is kept (langchain_core drops it)
    return type(self)(merge_content(self.content, *(o.content for o in others)),
                      additional_kwargs=kwargs, response_metadata=meta, name=name, id=self.id, **own)


class HumanMessageChunk(HumanMessage):
    """A piece of a streamed human message; chunks add up with `+` (see `_add_chunks`).

    >>> HumanMessageChunk("Hel", id="1") + HumanMessageChunk("lo")
    HumanMessageChunk(content='Hello', id='1')
    """
    __slots__ = ()
    __add__ = _add_chunks


class SystemMessageChunk(SystemMessage):
    """A piece of a streamed system message; chunks add up with `+`.

    >>> SystemMessageChunk("Be ") + [SystemMessageChunk("brief"), SystemMessageChunk(".")]
    SystemMessageChunk(content='Be brief.')
    """
    __slots__ = ()
    __add__ = _add_chunks


class ToolMessageChunk(ToolMessage):
    """A piece of a streamed tool result; only chunks of one `tool_call_id` add up.

    >>> ToolMessageChunk("4", tool_call_id="c1") + ToolMessageChunk("2", tool_call_id="c1")
    ToolMessageChunk(content='42', tool_call_id='c1')
    >>> ToolMessageChunk("4", tool_call_id="c1") + ToolMessageChunk("2", tool_call_id="c2")
    Traceback (most recent call last):
    ...
    ValueError: Cannot concatenate ToolMessageChunks with different names. (tool_call_id 'c1' and 'c2': only chunks of one message add up)
    """
    __slots__ = ()
    __add__ = _add_chunks


class ChatMessageChunk(ChatMessage):
    """A piece of a streamed `ChatMessage`; only chunks of one `role` add up.

    >>> ChatMessageChunk("Looks ", role="critic") + ChatMessageChunk("good.", role="critic")
    ChatMessageChunk(content='Looks good.', role='critic')
    """
    __slots__ = ()
    __add__ = _add_chunks


_CHUNKS = (AIMessageChunk, HumanMessageChunk, SystemMessageChunk, ToolMessageChunk, ChatMessageChunk)


_ROLES: Dict[str, type] = {"system": SystemMessage, "human": HumanMessage, "user": HumanMessage,
                           "ai": AIMessage, "assistant": AIMessage}


def _to_message(item: Any) -> BaseMessage:
    """A message from a message, a `(role, text)` pair or a string (a human message)."""
    if isinstance(item, BaseMessage):
        return item
    if isinstance(item, str):
        return HumanMessage(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        role, content = item
        if role not in _ROLES:
            raise ValueError(f"unknown message role {role!r}; use one of {sorted(_ROLES)}")
        return cast(BaseMessage, _ROLES[role](content))
    raise TypeError(f"cannot make a message from {type(item).__name__}: {_short(item)}; "
                    "pass a message, a (role, text) tuple or a string")


def _text_of(chunk: Any) -> str:
    """The text a parser reads from a chunk: a message's text, or the string itself."""
    if isinstance(chunk, BaseMessage):
        return chunk.text
    if isinstance(chunk, str):
        return chunk
    raise TypeError(f"a parser reads messages or strings, not {type(chunk).__name__}: "
                    f"{_short(chunk)}")


class Document:
    """A piece of text with metadata, as retrievers return it.

    >>> Document("harrison worked at kensho", metadata={"source": "wiki"})
    Document(metadata={'source': 'wiki'}, page_content='harrison worked at kensho')
    """

    def __init__(self, page_content: str, *, metadata: Optional[Dict[str, Any]] = None,
                 id: Optional[str] = None) -> None:
        self.page_content = page_content
        self.metadata = metadata or {}
        self.id = id

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Document) and self.page_content == other.page_content
                and self.metadata == other.metadata and self.id == other.id)

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def __repr__(self) -> str:
        id_part = f"id={self.id!r}, " if self.id else ""
        return f"Document({id_part}metadata={self.metadata!r}, page_content={self.page_content!r})"


_MISSING: Any = object()  # "no value yet": distinct from None, which is a value


def _add(a: Any, b: Any) -> Any:
    """The fold step: `a + b`, or `b` where the two do not add (the newer value wins).

    >>> _add("a", "b"), _add([1], [2]), _add({"x": 1}, {"y": 2}), _add(_MISSING, 3)
    ('ab', [1, 2], {'y': 2}, 3)
    """
    if a is _MISSING:
        return b
    try:
        return a + b
    except TypeError:
        return b


class AddableDict(Dict[str, Any]):
    """A dict whose `+` merges key by key; a parallel step's chunks are these.

    Values under the same key are added; where they do not add (two JSON snapshots), the newer
    one is kept for that key only.

    >>> AddableDict(a="x") + AddableDict(b=1) + AddableDict(a="y")
    {'a': 'xy', 'b': 1}
    >>> AddableDict(j={}) + AddableDict(s="t1") + AddableDict(j={"x": 1})
    {'j': {'x': 1}, 's': 't1'}
    """

    def __add__(self, other: Any) -> "AddableDict":
        if not isinstance(other, dict):
            return NotImplemented
        merged = AddableDict(self)
        for key, value in other.items():
            if merged.get(key) is None:
                merged[key] = value
            elif value is not None:  # None adds nothing
                # deviation: values that do not add keep the newer one for this key only
                # (langchain_core raises, and its fold restarts, losing the other keys)
                merged[key] = _add(merged[key], value)
        return merged

    def __radd__(self, other: Any) -> "AddableDict":
        """A plain dict on the left merges the same way, its values first."""
        return AddableDict(other) + self if isinstance(other, dict) else NotImplemented


# ==============================================================================================
# 2. Config, runs, events and the fold
#
# The active config lives in one context variable. A runnable called anywhere below (inside a
# function, a tool, a task, a worker thread minichain starts) inherits it; its `callbacks` entry
# is the parent `Run` when someone listens. Events are plain dicts, made only when a listener
# exists. `_add` (section 1) is the one fold every step that needs its whole input uses.
# ==============================================================================================

if TYPE_CHECKING:
    RunnableConfig = Dict[str, Any]
else:
    class RunnableConfig(TypedDict, total=False):
        """A call's config, a plain dict: `RunnableConfig(tags=["a"])` is `{"tags": ["a"]}`.

        >>> RunnableConfig(tags=["a"], metadata={"user": 1})
        {'tags': ['a'], 'metadata': {'user': 1}}
        """

        run_name: str  # the name of this call's run in events
        run_id: Any  # its id (a str or uuid.UUID)
        tags: List[str]  # inherited by every run below
        metadata: Dict[str, Any]  # the same
        callbacks: Any  # listeners: functions taking an event, or callback handlers
        max_concurrency: int  # for batch and parallel steps
        configurable: Dict[str, Any]
        recursion_limit: int  # how deep functions returning runnables may nest (25)


Event = Dict[str, Any]  # one v2 stream event: event, name, run_id, parent_ids, tags, metadata, data
Listener = Callable[[Event], None]  # a listener: receives every event of a run and its children

_CONFIG_KEYS = ("run_name", "run_id", "tags", "metadata", "callbacks", "max_concurrency",
                "configurable", "recursion_limit")
_current: "contextvars.ContextVar[Optional[RunnableConfig]]" = contextvars.ContextVar(
    "minichain_config", default=None)


def _fold(chunks: Iterable[Any]) -> Any:
    """All chunks `+`-ed together (`_MISSING` for none); of snapshots, the last."""
    it = iter(chunks)
    first = next(it, _MISSING)
    second = _MISSING if first is _MISSING else next(it, _MISSING)
    if second is _MISSING:  # none or one (what `invoke` mostly sees): nothing to add
        return first
    fold = _Latest() if isinstance(chunks, _Snapshots) else _Fold()
    fold.add(first)
    fold.add(second)
    for chunk in it:
        fold.add(chunk)
    return fold.value()


async def _afold(chunks: AsyncIterator[Any]) -> Any:
    """All chunks of an async iterator `+`-ed together (`_MISSING` for none); of snapshots,
    the last."""
    fold = _Latest() if isinstance(chunks, _ASnapshots) else _Fold()
    try:
        async for chunk in chunks:
            fold.add(chunk)
        return fold.value()
    finally:
        await _aclose(chunks)


async def _aiter(items: Iterable[T]) -> AsyncIterator[T]:
    """An async iterator over a plain iterable."""
    for item in items:
        yield item


async def _anext(it: AsyncIterator[T]) -> Any:
    """The next item of an async iterator, or `_MISSING` at its end (`next(it, _MISSING)`)."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return _MISSING


class _Fold:
    """A `+`-fold that grows one chunk at a time and keeps little per chunk: `add(a)`, `add(b)`,
    then `value()` is `a + b`. Text (strings, and the content of message chunks that carry
    nothing else) is kept as pieces joined once at the end; `AddableDict`s (a parallel step's
    chunks) fold key by key; anything else (plain dicts too) is added as it comes. A run folds its input and output with this for its
    end event, so a long answer costs a string per chunk, not a chunk object.

    >>> fold = _Fold()
    >>> for chunk in [AIMessageChunk("a", id="x"), AIMessageChunk("b"), AIMessageChunk("c", chunk_position="last")]:
    ...     fold.add(chunk)
    >>> fold.value()
    AIMessageChunk(content='abc', id='x', chunk_position='last')
    """

    __slots__ = ("kind", "texts", "blocks", "parts", "keys", "total")

    def __init__(self) -> None:
        self.kind: Any = None  # str, AIMessageChunk, AddableDict, list, or object (anything else)
        self.texts: List[str] = []  # the latest pieces of text, not yet joined
        self.blocks: List[str] = []  # earlier pieces, joined 256 at a time
        self.parts: List[Any] = []  # message chunks that carry more than text
        self.keys: Dict[str, _Fold] = {}
        self.total: Any = _MISSING

    def add(self, chunk: Any) -> None:
        if chunk.__class__ is self.kind:
            if self.kind is str:
                self.texts.append(chunk)
            elif self.kind is AIMessageChunk and chunk.content.__class__ is str and _bare(chunk, self.parts[0].id):
                self.texts.append(chunk.content)
            else:
                self._add(chunk)
                return
            if len(self.texts) >= 256:  # a string is cheaper than 256 small ones
                self.blocks.append("".join(self.texts))
                self.texts = []
            return
        self._add(chunk)

    def _text(self) -> str:
        return "".join(self.blocks + self.texts)

    def _add(self, chunk: Any) -> None:
        kind = AddableDict if isinstance(chunk, AddableDict) else chunk.__class__
        if self.kind is None and kind in (str, AIMessageChunk, AddableDict, list):
            self.kind = kind
        elif kind is not self.kind and self.kind is not object:  # mixed kinds: add as they come
            self.total, self.kind = self.value(), object
        if self.kind is str:
            self.texts.append(chunk)
        elif self.kind is list:  # extended in place (a copy of the first chunk, never a chunk)
            if self.total is _MISSING:
                self.total = list(chunk)
            else:
                self.total.extend(chunk)
        elif self.kind is AIMessageChunk:
            self._flush()
            self.parts.append(chunk)
        elif self.kind is AddableDict:
            for key, value in chunk.items():
                fold = self.keys.get(key)
                if fold is None:
                    fold = self.keys[key] = _Latest() if isinstance(chunk, _Snapshot) else _Fold()
                if value is not None:  # None is "no value": any value replaces it
                    fold.add(value)
        else:
            self.total = _add(self.total, chunk)

    def _flush(self) -> None:
        if self.texts or self.blocks:
            self.parts.append(AIMessageChunk(self._text(), id=self.parts[0].id))
            self.texts, self.blocks = [], []

    def value(self) -> Any:
        """The fold so far (`_MISSING` if nothing was added)."""
        if self.kind is str:
            return self._text()
        if self.kind is list:
            return self.total
        if self.kind is AIMessageChunk:
            self._flush()
            return self.parts[0] if len(self.parts) == 1 else AIMessageChunk.join(self.parts)
        if self.kind is AddableDict:
            return AddableDict({k: None if f.kind is None else f.value() for k, f in self.keys.items()})
        return self.total


class _Snapshot(AddableDict):
    """A parallel step's chunk from a branch that streams snapshots (`{"json": {...}}`): a
    fold keeps that key's last value instead of adding them up. (`+` still adds, as
    `AddableDict` does.)"""


class _Latest(_Fold):
    """The fold of snapshots: each chunk is the whole value so far, so the last one wins."""

    __slots__ = ()

    def add(self, chunk: Any) -> None:
        self.kind, self.total = object, chunk

    def value(self) -> Any:
        return self.total


def _close(it: Any) -> None:
    """Close a generator (or anything with `close`); plain iterators need nothing."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


async def _aclose(it: Any) -> None:
    """Close an async generator now, so its `finally` runs before we return."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


class _Snapshots(Iterator[Any]):
    """The output chunks of a step whose every chunk is its whole output so far (a snapshot,
    as `JsonOutputParser` streams them), marked so that a step folding them keeps the last
    instead of adding them up. Only such steps' chunks pass through it.

    >>> _fold(_Snapshots(iter([[10], [10, 20], [10, 20, 30]]))), _fold(iter([[10], [20]]))
    ([10, 20, 30], [10, 20])
    """

    __slots__ = ("chunks",)

    def __init__(self, chunks: Iterator[Any]) -> None:
        self.chunks = chunks

    def __next__(self) -> Any:
        return next(self.chunks)

    def close(self) -> None:
        _close(self.chunks)


class _ASnapshots(AsyncIterator[Any]):
    """The async twin of `_Snapshots`."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: AsyncIterator[Any]) -> None:
        self.chunks = chunks

    async def __anext__(self) -> Any:
        return await self.chunks.__anext__()

    async def aclose(self) -> None:
        await _aclose(self.chunks)


def _bare(chunk: AIMessageChunk, id: Optional[str]) -> bool:
    """Whether a message chunk is only text under the given id (the common per-token case)."""
    return not (chunk.additional_kwargs or chunk.response_metadata or chunk.tool_call_chunks
                or chunk.usage_metadata is not None or chunk.name or chunk.chunk_position
                or (chunk.id is not None and chunk.id != id))


def _uuid7() -> str:
    """A time-ordered UUID (version 7) as a string, as langchain_core uses for run ids:
    48 bits of Unix milliseconds, the version, random bits with the RFC 4122 variant."""
    t = f"{time.time_ns() // 1_000_000:012x}"
    r = os.urandom(10).hex()
    return f"{t[:8]}-{t[8:]}-7{r[:3]}-{'89ab'[int(r[3], 16) & 3]}{r[4:7]}-{r[8:]}"


def _listener(h: Any) -> Listener:
    """A listener from a callable or an object with methods named after events.

    A listener runs outside the run it listens to: a runnable it calls starts a run of its
    own, which does not report back to it. An `async def` listener returns its call for the
    async run to await. A listener that raises does not break the run: the error is logged
    (logger "minichain") and the run goes on, as in langchain_core; give the listener
    `raise_error = True` to have its errors raised instead. A listener with `errors = True`
    also hears `on_<type>_error` events (`Run.fail`; callback handlers do, event streams not).
    """
    if isinstance(h, _Channel):  # an event stream (section 5)
        return h  # minichain's own: it never calls runnables, and its errors are real
    adapter = getattr(h, "_as_listener", None)  # a callback handler (section 10)
    if adapter is not None:
        call = adapter()
    elif callable(h):
        call = cast(Listener, h)
    elif any(name.startswith("on_") for name in dir(h)):
        def call(event: Event) -> Any:
            method = getattr(h, event["event"], None)
            return None if method is None else method(event)
    else:
        raise TypeError(f"callbacks entry {_short(h)} is neither callable nor has on_* methods; "
                        "pass a function taking an event dict, or an object with methods like "
                        "on_chat_model_stream(event)")
    raise_error = getattr(h, "raise_error", False)

    def failed(event: Event, exc: Exception) -> None:
        if raise_error:
            raise exc
        import logging
        # deviation: logged on the `minichain` logger, with how to raise instead (langchain_core
        # logs on its callback manager's logger)
        logging.getLogger("minichain").warning(
            "callback %s failed on %s and was skipped: %r (set raise_error = True on it to "
            "raise instead)", _short(h, 60), event["event"], exc)

    def guarded(event: Event) -> Any:
        try:
            result = call(event)
        except Exception as exc:
            failed(event, exc)
            return None
        if result is not None and inspect.isawaitable(result):  # for the async run to await
            return result, lambda exc: failed(event, exc)
        return None
    guarded.errors = getattr(h, "errors", False)  # type: ignore[attr-defined]
    return guarded


class Run:
    """One execution of a runnable, as listeners see it: identity, tags and event emission.

    A Run exists only while someone listens. It sits in a child config's `callbacks` so that
    runnables called below report as its children; it folds its input and output for the end
    event. `emit` sends an event to every listener.

    >>> seen = []
    >>> _ = RunnableLambda(lambda x: x + 1).invoke(1, {"callbacks": [seen.append]})
    >>> [(e["event"], e["name"], e["data"]) for e in seen]
    [('on_chain_start', 'RunnableLambda', {'input': 1}), ('on_chain_end', 'RunnableLambda', {'output': 2})]
    """

    __slots__ = ("id", "name", "type", "tags", "inherited_tags", "metadata", "parent_ids",
                 "listeners", "root", "streams", "input", "input_fold", "output_fold", "channel",
                 "solo", "pending", "data_second", "failed")

    def __init__(self, name: str, run_type: str, tags: List[str], metadata: Dict[str, Any],
                 parent: Optional["Run"], listeners: Sequence[Listener], run_id: Any,
                 streams: bool, positional: bool = False) -> None:
        self.id = str(run_id) if run_id else _uuid7()  # a uuid.UUID given by the caller, too
        self.name, self.type, self.tags, self.metadata = name, run_type, tags, metadata
        # what a custom event shows: the tags without the step's place (`seq:step:2`)
        self.inherited_tags = tags[1:] if positional else tags
        self.parent_ids: List[str] = parent.parent_ids + [parent.id] if parent else []
        # `streams`: it reports on_<type>_stream events (one that does not holds its output
        # till its end event: `Runnable._passes`)
        self.listeners, self.root, self.streams = listeners, parent is None, streams
        self.input: Any = _MISSING  # the whole input, where it was known or folded up front
        self.input_fold = _Fold()  # else the input chunks seen, folded as they come
        self.output_fold = _Fold()  # the output chunks, folded as they come
        # the event stream this run reports to, if any (it may pause the run: backpressure;
        # `_Channel` is section 5's)
        self.channel: Optional[_Channel] = parent.channel if parent else next(
            (h for h in listeners if isinstance(h, _Channel)), None)
        # the event stream, when it is the only listener: events go straight to it
        self.solo = self.channel if list(listeners) == [self.channel] else None
        # a nested model's tokens: langchain_core builds their events with `data` second
        self.data_second = parent is not None and run_type in ("chat_model", "llm")
        # async listeners' calls (and what to do if one fails), awaited in order by the run
        self.pending: List[Tuple[Awaitable[Any], Callable[[Exception], None]]] = []
        self.failed = False  # its error event went out (a tool sends its own)

    def adding(self, listeners: Any) -> "Run":
        """This run as the parent of runs that also report to `listeners` (a step bound with
        its own callbacks, inside a run that already has listeners); `listeners` is a list,
        or another run, whose listeners join ours once each."""
        import copy
        extra = listeners.listeners if isinstance(listeners, Run) else [_listener(h) for h in listeners]
        parent = copy.copy(self)
        parent.listeners = list(self.listeners) + [h for h in extra if h not in self.listeners]
        parent.solo = None if len(parent.listeners) > 1 else self.solo
        return parent

    def emit(self, event: Event, listeners: Optional[Sequence[Listener]] = None) -> None:
        """Send one event to every listener (or to `listeners`), outside this run: a runnable a
        listener calls does not report back to it. An async listener's call waits in
        `pending` until the async run awaits it (`settle`)."""
        if self.solo is not None and listeners is None:  # only an event stream listens
            self.solo(event)
            return
        # deviation: langchain_core leaves the run active, so a listener's own calls report back
        token = _current.set(None)
        try:
            for listener in listeners or self.listeners:
                call = listener(event)
                if call is not None:
                    self.pending.append(call)
        finally:
            _current.reset(token)

    async def settle(self) -> None:
        """Await the async listeners' calls, in the order of their events, outside the run."""
        while self.pending:
            call, failed = self.pending.pop(0)
            token = _current.set(None)
            try:
                await call
            except Exception as exc:
                failed(exc)
            finally:
                _current.reset(token)

    def refuse_async(self, quietly: bool = False) -> None:
        """Refuse async listeners in a sync run: nothing there could await them (`quietly`:
        drop their calls without raising)."""
        # deviation: langchain_core runs each call with asyncio.run, blocking the run
        if self.pending:
            for call, _ in self.pending:
                getattr(call, "close", lambda: None)()
            self.pending.clear()
            if quietly:
                return
            raise TypeError(f"an async listener (callback) cannot be awaited in the sync run "
                            f"{self.name!r} (sync code: invoke/stream, or a sync step inside an "
                            "async call); run it with ainvoke/astream/astream_events and async "
                            "steps, or pass a sync listener")

    def start(self, data: Dict[str, Any]) -> None:
        """Emit `on_<type>_start`."""
        self.emit({"event": f"on_{self.type}_start", "data": data, "name": self.name,
                   "tags": self.tags, "run_id": self.id, "metadata": self.metadata,
                   "parent_ids": self.parent_ids})

    def chunk(self, chunk: Any) -> None:
        """Fold one output chunk; emit `on_<type>_stream` for it where this run streams."""
        self.output_fold.add(chunk)
        if not self.streams:
            return
        if self.data_second:
            event = {"event": f"on_{self.type}_stream", "data": {"chunk": chunk},
                     "run_id": self.id, "name": self.name, "tags": self.tags,
                     "metadata": self.metadata, "parent_ids": self.parent_ids}
        else:
            event = {"event": f"on_{self.type}_stream", "run_id": self.id, "name": self.name,
                     "tags": self.tags, "metadata": self.metadata, "data": {"chunk": chunk},
                     "parent_ids": self.parent_ids}
        if self.solo is not None:  # the per-chunk path of an event stream: straight to it
            self.solo(event)
        else:
            self.emit(event)

    def fail(self, error: BaseException) -> None:
        """Tell the listeners that take errors (callback handlers, `with_listeners`) that this
        run failed: `on_<type>_error`, an event the event streams do not show (nor does
        langchain_core's v2)."""
        wanting = [h for h in self.listeners if getattr(h, "errors", False)]
        if wanting and not self.failed:
            self.failed = True
            self.emit({
                "event": f"on_{self.type}_error", "data": {"error": error}, "run_id": self.id,
                "name": self.name, "tags": self.tags, "metadata": self.metadata,
                "parent_ids": self.parent_ids}, wanting)

    def end(self, output: Any, extra: Optional[Dict[str, Any]] = None) -> None:
        """Emit `on_<type>_end` with the output (and the input, except for the root)."""
        data = {"output": output}
        # deviation: only the root's end event goes without its input (langchain_core drops it from
        # the run of the first event that passes the filters, wherever that run is)
        if not self.root and (self.input is not _MISSING or self.input_fold.kind is not None):
            data["input"] = self.input if self.input is not _MISSING else self.input_fold.value()
        if extra:
            data.update(extra)
        self.emit({"event": f"on_{self.type}_end", "data": data, "run_id": self.id,
                   "name": self.name, "tags": self.tags, "metadata": self.metadata,
                   "parent_ids": self.parent_ids})


def _merge_configs(base: Optional[RunnableConfig], extra: Optional[Mapping[str, Any]]) -> RunnableConfig:
    """`extra` over `base`: tags (kept sorted) and metadata accumulate, other keys are replaced."""
    if not extra:
        return dict(base) if base else {}
    unknown = [k for k in extra if k not in _CONFIG_KEYS and k != "_kwargs"]
    if unknown:
        raise TypeError(f"unknown config key{'s' if len(unknown) > 1 else ''} {unknown}; a "
                        f"config takes {list(_CONFIG_KEYS)}")
    out = dict(base) if base else {}
    for key, value in extra.items():
        if value is None:
            continue
        _check_config_value(key, value)
        if key == "tags":
            out[key] = sorted(set(out.get("tags", ())) | set(value))  # sorted, as langchain_core
        elif key == "metadata":
            # deviation: a second with_config adds tags and metadata (langchain_core replaces them)
            out[key] = {**out.get("metadata", {}), **value}
        elif key == "configurable":
            out[key] = {**out.get("configurable", {}), **value}
        else:
            out[key] = value
    return out


def _check_config_value(key: str, value: Any) -> None:
    """Refuse a config value of the wrong type where it is given, naming the key and the fix.

    >>> _check_config_value("callbacks", print)
    Traceback (most recent call last):
    ...
    TypeError: config callbacks must be a list of listeners, not a single builtin_function_or_method; write callbacks=[print]
    """
    if key == "tags" and isinstance(value, str):
        raise TypeError(f"config tags must be a list of str, not the str {_short(value, 40)}; "
                        f"write tags=[{_short(value, 40)}]")
    if key == "tags" and (not isinstance(value, (list, tuple, set, frozenset))
                          or not all(isinstance(t, str) for t in value)):
        raise TypeError(f"config tags must be a list of str, not {_short(value, 60)}")
    if key in ("metadata", "configurable") and not isinstance(value, Mapping):
        raise TypeError(f"config {key} must be a dict, not {type(value).__name__}: {_short(value, 60)}")
    if key == "callbacks" and not isinstance(value, (list, tuple, Run)):
        name = getattr(value, "__name__", None) or "listener"
        raise TypeError(f"config callbacks must be a list of listeners, not a single "
                        f"{type(value).__name__}; write callbacks=[{name}]")
    if key in ("max_concurrency", "recursion_limit") and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise TypeError(f"config {key} must be an int >= 1, not {_short(value, 40)}")
    if key == "run_name" and not isinstance(value, str):
        raise TypeError(f"config run_name must be a str, not {type(value).__name__}")


def _child_config(config: RunnableConfig, run: Optional[Run]) -> RunnableConfig:
    """The config that runnables called inside a run inherit (no name or id of its own)."""
    if run is None and "run_name" not in config and "run_id" not in config:
        return config  # nothing to drop or add: share it
    child = {k: v for k, v in config.items() if k not in ("run_name", "run_id")}
    if run is not None:
        child["callbacks"] = run
    return child


def _open_run(runnable: "Runnable[Any, Any]", config: RunnableConfig, tag: Optional[str],
              streams: bool) -> Optional[Run]:
    """A Run for `runnable` if anyone listens, else None (no ids, no events, no cost)."""
    callbacks = config.get("callbacks")
    if not callbacks:
        return None
    if isinstance(callbacks, Run):
        parent: Optional[Run] = callbacks
        listeners: Sequence[Listener] = callbacks.listeners
    else:
        parent = None
        listeners = [_listener(h) for h in callbacks]
    tags = ([tag] if tag else []) + list(config.get("tags", ())) + runnable._own_tags()
    metadata = {**config.get("metadata", {}), **runnable._own_metadata(config)}
    run = Run(config.get("run_name") or runnable.get_name(), runnable.run_type,
              list(dict.fromkeys(tags)), metadata, parent, listeners, config.get("run_id"),
              streams, positional=bool(tag) and tags.count(tag) == 1)
    if runnable._cumulative:
        run.output_fold = _Latest()
    return run


# ==============================================================================================
# 3. The Runnable protocol: transform, stream, invoke, batch
#
# A component writes `_transform` (input chunks -> output chunks) and, where it awaits real I/O,
# `_atransform`; or, if it needs its whole input, just `_produce(value)`. Everything else below
# is derived. `_stream_run` is the one place a run opens, streams and ends.
# ==============================================================================================

_STREAMING_TYPES = ("chain", "parser", "chat_model", "llm")


class Runnable(Generic[Input, Output]):
    """A unit of work that streams: the protocol every component implements.

    A component writes `_transform(inputs, config)` (a generator from input chunks to output
    chunks), or `_produce(value, config)` if it needs its whole input first; async twins
    (`_atransform`, `_aproduce`) only where real I/O differs. Every public method is derived:

    - `stream(x)` is `transform(iter([x]))`; `astream` its async twin.
    - `invoke(x)` is the `+`-fold of the output chunks; `ainvoke` its async twin.
    - `batch(xs)` is `invoke` over `xs` on threads; `abatch` with a semaphore.
    - `a | b` is `RunnableSequence(a, b)`.

    >>> double = RunnableLambda(lambda x: x * 2)
    >>> double.invoke(3), list(double.stream(3)), double.batch([1, 2])
    (6, [6], [2, 4])
    >>> (double | double).invoke(1)
    4
    """

    name: Optional[str] = None
    run_type = "chain"  # the event family: on_<run_type>_start / _stream / _end
    input_in_start = False  # fold the input before the run starts and show it in the start event
    _user_code = False  # runs user code, which may call runnables or dispatch custom events
    _cumulative = False  # each output chunk is the whole output so far: folds keep the last
    _opaque = False  # a subclass that writes `invoke` or `ainvoke` itself (no run of its own)
    # it only passes on what it runs: nested, it reports no stream events of its own (as in
    # langchain_core, whose event stream taps only such a runnable at the root), and its chunks
    # move on at once (fallbacks and branches, section 9; RemoteRunnable, section 15)
    _passes_through = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._opaque = (cls.invoke is not Runnable.invoke or cls.ainvoke is not Runnable.ainvoke) \
            and cls._transform is Runnable._transform and cls._produce is Runnable._produce

    # -- what components write ----------------------------------------------------------------

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        """The output chunks for one whole input value (for steps that fold their input).
        A subclass that writes only `invoke` streams its result as one chunk."""
        if type(self).invoke is not Runnable.invoke:
            yield self.invoke(value, config)
        elif self._opaque:
            raise _sync_only(type(self).__name__, "invoke/stream")
        else:
            raise NotImplementedError(f"{type(self).__name__} must implement invoke, _transform "
                                      "or _produce")

    async def _aproduce(self, value: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        """Async twin of `_produce`; by default runs the sync one inline (pure components),
        a subclass's own `ainvoke`, or its `invoke` on a worker thread."""
        if type(self).ainvoke is not Runnable.ainvoke:
            yield await self.ainvoke(value, config)
        elif self._opaque:
            ctx = contextvars.copy_context()
            yield await asyncio.get_running_loop().run_in_executor(None, ctx.run, self.invoke,
                                                                   value, config)
        else:
            for chunk in self._produce(value, config):
                yield chunk

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        """Input chunks -> output chunks. By default: fold the input, then `_produce`."""
        value = _fold(inputs)
        if value is not _MISSING:
            yield from self._produce(value, config)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        """Async twin of `_transform`."""
        value = await _afold(inputs)
        if value is not _MISSING:
            agen = self._aproduce(value, config)
            try:
                async for chunk in agen:
                    yield chunk
            finally:
                await _aclose(agen)

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        """`_transform` as `invoke` runs it (a sequence invokes its steps one by one)."""
        return self._transform(inputs, config)

    def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        """Async twin of `_invoke_transform`."""
        return self._atransform(inputs, config)

    def _invoked(self, output: Any) -> Any:
        """What `invoke` returns for the folded output (a chat model makes a whole message)."""
        return output

    def _streams(self, invoked: bool) -> bool:
        """Whether this run emits stream events: chains and parsers when streamed, models always."""
        return self.run_type in _STREAMING_TYPES and (
            not invoked or self.run_type in ("chat_model", "llm"))

    def _event_output(self, output: Any) -> Any:
        """The `output` of this run's end event, given the folded output."""
        return output

    def _event_input(self, value: Any, end: bool) -> Any:
        """The `input` of this run's start (or end) event, for steps with `input_in_start`."""
        return value

    def _own_tags(self) -> List[str]:
        return []

    def _check_kwargs(self, kwargs: Dict[str, Any]) -> None:
        """Refuse call-time keyword arguments this runnable cannot take (most ignore them)."""

    def _own_metadata(self, config: RunnableConfig) -> Dict[str, Any]:
        return {}

    # -- the run: one place that opens, streams and ends it -----------------------------------

    def _stream_run(self, inputs: Iterator[Any], config: RunnableConfig, tag: Optional[str] = None,
                    known: Any = _MISSING, invoked: bool = False) -> Iterator[Any]:
        """Run `_transform` over `inputs` as one run of this runnable, reporting its events.

        `tag` is the step's place in its parent (`seq:step:2`, `map:key:a`); `known` is the
        whole input where the caller has it (shown in the start event); `invoked` says this
        is the `invoke` path (`_invoke_transform`; the end event shows what `invoke` returns).

        The life of a run, where someone listens (`_traced`): the run opens (`_open`) but
        starts only when its first input chunk arrives (`_begin`): no input, no events. Input
        chunks fold into it as they pass (`_tap`); the transform runs under the child config
        (`_scoped`); each output chunk is folded and, where the run streams, reported
        (`_passes`); then the run ends (`_end`). A run that does not stream holds its output
        until its end event has gone out, so that events come in langchain_core's order.
        """
        transform = self._invoke_transform if invoked else self._transform
        run = self._open(config, tag, invoked) if config.get("callbacks") else None
        if run is not None:
            chunks = self._traced(transform, inputs, config, run, known, invoked)
        else:
            child = _child_config(config, None)
            # user code may call runnables: give it the config; siblings may have to stop us
            if child or self._user_code or _stop.get() is not None:
                chunks = _scoped(transform(inputs, child), child)
            else:
                chunks = transform(inputs, child)
        return _Snapshots(chunks) if self._cumulative else chunks

    def _traced(self, transform: Callable[..., Iterator[Any]], inputs: Iterator[Any],
                config: RunnableConfig, run: Run, known: Any, invoked: bool) -> Iterator[Any]:
        """The run's chunks, as `_stream_run` tells its life, for sync code."""
        first = _fold(inputs) if self.input_in_start else next(inputs, _MISSING)
        if first is _MISSING:
            return
        tapped = self._begin(run, known, invoked, first, inputs,
                             iter([first]) if self.input_in_start else _tap(first, inputs, run))
        if run.pending:
            run.refuse_async()
        child = _child_config(config, run)
        chunks = _scoped(transform(tapped, child), child)
        held: List[Any] = []
        try:
            for chunk in chunks:
                if self._passes(run, chunk, held):
                    yield chunk
        except BaseException as exc:  # failed, or left early: closed, stopped, cancelled
            # deviation: listeners that take errors hear a stream left early as an error, as in
            # async code (langchain_core's sync runs end it with on_chain_end(None))
            run.fail(GeneratorExit() if isinstance(exc, _Stopped) else exc)  # ours stays ours
            raise
        finally:  # the input closes with this run, even if its transform never started
            _close(chunks)
            _close(inputs)
        self._end(run, invoked)
        if run.pending:
            run.refuse_async()
        yield from held

    # The parts of a run that do not wait, for both drivers (`_traced`, `_atraced`).

    def _open(self, config: RunnableConfig, tag: Optional[str], invoked: bool) -> Optional[Run]:
        """This call's run, where someone listens. A subclass's own `invoke` reports no run of
        its own, as in langchain_core."""
        if not config.get("callbacks") or self._opaque:
            return None
        run = _open_run(self, config, tag, self._streams(invoked))
        if self._passes_through and run is not None and not run.root:
            run.streams = False
        return run

    def _begin(self, run: Run, known: Any, invoked: bool, first: Any, upstream: Any, chunks: Any) -> Any:
        """Start the run, given its first input chunk (for a step with `input_in_start`, its
        whole input), the `upstream` it came from and the input `chunks` for its transform
        (which fold into the run as they pass: `_tap` reads `run.input_fold` only then);
        return those. The start event shows the input where the call gave it whole (the
        root, or a nested invoke), or as `_event_input` says."""
        if self.input_in_start:
            run.input = self._event_input(first, end=True)
            # deviation: the root's start event shows the call's input (langchain_core moves it
            # into the first event that passes the filters)
            shown = known if run.root and known is not _MISSING else self._event_input(first, end=False)
            run.start({"input": shown})
            return chunks
        run.start({"input": known} if known is not _MISSING and (run.root or invoked) else {})
        if isinstance(upstream, (_Snapshots, _ASnapshots)):  # the step before streams snapshots
            run.input_fold, chunks = _Latest(), type(upstream)(chunks)
        return chunks

    def _passes(self, run: Run, chunk: Any, held: List[Any]) -> bool:
        """Fold one output chunk into the run; whether it moves on now. A run that does not
        stream ends before its output moves on (as in langchain_core): it is held till then."""
        run.chunk(chunk)
        if run.streams or self._passes_through:
            return True
        held.append(chunk)
        return False

    def _end(self, run: Run, invoked: bool) -> None:
        output = run.output_fold.value()
        if output is _MISSING:  # no output chunks: the end event shows None, as langchain_core's
            run.end(None)
            return
        run.end(self._event_output(self._invoked(output) if invoked else output))

    def _astream_run(self, inputs: AsyncIterator[Any], config: RunnableConfig,
                     tag: Optional[str] = None, known: Any = _MISSING,
                     invoked: bool = False) -> AsyncIterator[Any]:
        """Async twin of `_stream_run`."""
        transform = self._ainvoke_transform if invoked else self._atransform
        run = self._open(config, tag, invoked) if config.get("callbacks") else None
        if run is not None:
            chunks = self._atraced(transform, inputs, config, run, known, invoked)
        else:
            child = _child_config(config, None)
            chunks = _ascoped(transform(inputs, child), child) if child or self._user_code \
                else transform(inputs, child)
        return _ASnapshots(chunks) if self._cumulative else chunks

    async def _atraced(self, transform: Callable[..., AsyncIterator[Any]],
                       inputs: AsyncIterator[Any], config: RunnableConfig, run: Run, known: Any,
                       invoked: bool) -> AsyncIterator[Any]:
        """The async twin of `_traced`: it also awaits async listeners' calls (`settle`), and
        lets the event stream's consumer catch up before each pull (`pause`)."""
        first = await (_afold(inputs) if self.input_in_start else _anext(inputs))
        if first is _MISSING:
            return
        tapped = self._begin(run, known, invoked, first, inputs,
                             _aiter([first]) if self.input_in_start else _atap(first, inputs, run))
        child = _child_config(config, run)
        agen = _ascoped(transform(tapped, child), child)
        channel = run.channel
        held: List[Any] = []
        try:
            while True:
                if run.pending:
                    await run.settle()
                if channel is not None and channel.buffer:  # backpressure: the consumer first
                    await channel.pause()
                try:  # (not `_anext`: an extra coroutine per chunk costs a third here)
                    chunk = await agen.__anext__()
                except StopAsyncIteration:
                    break
                if self._passes(run, chunk, held):
                    if run.pending:
                        await run.settle()
                    yield chunk
        except BaseException as exc:  # failed, or left early: closed, stopped, cancelled
            run.fail(GeneratorExit() if isinstance(exc, _Stopped) else exc)  # ours stays ours
            try:
                await run.settle()
            except BaseException:  # cancelled again while settling: what is left is dropped
                run.refuse_async(quietly=True)
            raise
        finally:
            await _aclose(agen)
            await _aclose(inputs)
        self._end(run, invoked)
        await run.settle()
        for chunk in held:
            yield chunk

    def _invoke(self, value: Any, config: RunnableConfig, tag: Optional[str] = None) -> Any:
        out = _fold(self._stream_run(iter([value]), config, tag, value, invoked=True))
        return None if out is _MISSING else self._invoked(out)

    async def _ainvoke(self, value: Any, config: RunnableConfig, tag: Optional[str] = None) -> Any:
        out = await _afold(self._astream_run(_aiter([value]), config, tag, value, invoked=True))
        return None if out is _MISSING else self._invoked(out)

    # -- the public interface -----------------------------------------------------------------
    # (`|`, `assign`, `with_fallbacks`..., the event APIs and `with_listeners` return or call
    # what sections 4, 5, 9 and 10 build on this protocol: they are here so that every runnable
    # has them, as in langchain_core.)

    def get_name(self, suffix: Optional[str] = None, *, name: Optional[str] = None) -> str:
        """The run's name in events: `name` if set, else the class name (a `run_name` bound
        with `with_config` names the runs, not the runnable, as in langchain_core). A
        `suffix` is appended: `Title`-cased after a capitalised name, else after `_`.

        >>> r = RunnableLambda(lambda x: x)
        >>> r.get_name(), r.with_config(run_name="mine").get_name(), r.get_name("input")
        ('RunnableLambda', 'RunnableLambda', 'RunnableLambdaInput')
        """
        name = name or self._name()
        if not suffix:
            return name
        return name + suffix.title() if name[:1].isupper() else f"{name}_{suffix.lower()}"

    def _name(self) -> str:
        return self.name or type(self).__name__

    def transform(self, input: Iterator[Input], config: Optional[RunnableConfig] = None,
                  **kwargs: Any) -> Iterator[Output]:
        """Stream output chunks from an iterator of input chunks.

        Keyword arguments go to this runnable only, as with `bind` (a model's `stop`).

        >>> list(StrOutputParser().transform(iter(["a", "b"])))
        ['a', 'b']
        """
        return self._stream_run(iter(input), _resolve(config, self, kwargs))

    def atransform(self, input: AsyncIterator[Input], config: Optional[RunnableConfig] = None,
                   **kwargs: Any) -> AsyncIterator[Output]:
        """Async twin of `transform`: an async iterator of input chunks in, output chunks out.

        >>> async def main():
        ...     return [c async for c in StrOutputParser().atransform(_aiter(["a", "b"]))]
        >>> asyncio.run(main())
        ['a', 'b']
        """
        return self._astream_run(input, _resolve(config, self, kwargs))

    def stream(self, input: Input, config: Optional[RunnableConfig] = None, **kwargs: Any) -> Iterator[Output]:
        """`transform(iter([input]))`: the output chunks as they are produced.

        >>> list(GenericFakeChatModel(messages=iter(["hi there"])).stream("hello"))[0]  # doctest: +ELLIPSIS
        AIMessageChunk(content='hi', id='lc_run--...')
        """
        return self._stream_run(iter([input]), _resolve(config, self, kwargs), None, input)

    def astream(self, input: Input, config: Optional[RunnableConfig] = None, **kwargs: Any) -> AsyncIterator[Output]:
        """Async twin of `stream`.

        >>> async def main():
        ...     return [c async for c in RunnableLambda(str.upper).astream("hi")]
        >>> asyncio.run(main())
        ['HI']
        """
        return self._astream_run(_aiter([input]), _resolve(config, self, kwargs), None, input)

    def invoke(self, input: Input, config: Optional[RunnableConfig] = None, **kwargs: Any) -> Output:
        """The whole output: the `+`-fold of what `stream` would yield.

        >>> (RunnableLambda(lambda x: x + 1) | RunnableLambda(lambda x: x * 10)).invoke(1)
        20
        """
        return cast(Output, self._invoke(input, _resolve(config, self, kwargs)))

    async def ainvoke(self, input: Input, config: Optional[RunnableConfig] = None, **kwargs: Any) -> Output:
        """Async twin of `invoke`.

        >>> asyncio.run(RunnableLambda(lambda x: x + 1).ainvoke(1))
        2
        """
        return cast(Output, await self._ainvoke(input, _resolve(config, self, kwargs)))

    def batch(self, inputs: List[Input], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> List[Output]:
        """`[invoke(x) for x in inputs]`, run on threads (at most `max_concurrency` at once).

        With `return_exceptions=True` a failed input's exception takes its place in the result.

        >>> def check(x):
        ...     if x == 3:
        ...         raise ValueError("three")
        ...     return x * 10
        >>> RunnableLambda(check).batch([1, 2, 3, 4], return_exceptions=True)
        [10, 20, ValueError('three'), 40]
        """
        _check_inputs("batch", inputs)
        if not inputs:
            return []
        configs = [_with_call(c, self, kwargs) for c in _batch_configs(config, len(inputs))]
        workers = configs[0].get("max_concurrency") or min(32, len(inputs))

        def one(value: Input, cfg: RunnableConfig) -> Callable[[], Any]:
            def call() -> Any:
                try:
                    return self._invoke(value, cfg)
                except Exception as exc:
                    if return_exceptions:
                        return exc
                    raise
            return call
        return _run_all([one(v, c) for v, c in zip(inputs, configs)], workers)

    async def abatch(self, inputs: List[Input], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> List[Output]:
        """Async twin of `batch`: `ainvoke` over `inputs`, at most `max_concurrency` at once.

        >>> asyncio.run(RunnableLambda(lambda x: -x).abatch([1, 2], {"max_concurrency": 1}))
        [-1, -2]
        """
        _check_inputs("abatch", inputs)
        configs = [_with_call(c, self, kwargs) for c in _batch_configs(config, len(inputs))]
        limit = configs[0].get("max_concurrency") if configs else None
        gate = asyncio.Semaphore(limit) if limit else None

        async def one(value: Input, cfg: RunnableConfig) -> Any:
            try:
                if gate is None:
                    return await self._ainvoke(value, cfg)
                async with gate:
                    return await self._ainvoke(value, cfg)
            except Exception as exc:
                if return_exceptions:
                    return exc
                raise
        return await _gather([one(v, c) for v, c in zip(inputs, configs)])

    def astream_events(self, input: Any, config: Optional[RunnableConfig] = None, *,
                       version: str = "v2", include_names: Optional[Sequence[str]] = None,
                       include_types: Optional[Sequence[str]] = None,
                       include_tags: Optional[Sequence[str]] = None,
                       exclude_names: Optional[Sequence[str]] = None,
                       exclude_types: Optional[Sequence[str]] = None,
                       exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> AsyncIterator[Event]:
        """`astream(input)` with a listener attached: every run's events, live, as v2 dicts.

        Each event has `event, name, run_id, parent_ids, tags, metadata, data`. Filters work
        as in langchain_core: an event is kept if it matches any `include_*` (or none was
        given) and no `exclude_*`; `types` are run types (`chat_model`, `parser`, ...).

        Events are handed over as the run makes them, with backpressure: the run waits
        while the consumer is behind, at most the events of one step ahead (a parallel
        branch or a sync step on a worker thread: at most 64). The run executes in the task
        that reads the events. Leaving the loop (`break` and `aclose()`) or cancelling stops
        the run at its next chunk; its generators and connections are closed before
        `aclose()` returns (a sync function on a worker thread is told to stop, and ends in
        the background if it is busy in code of its own).

        >>> async def main():
        ...     chain = RunnableLambda(lambda x: x + 1).with_config(run_name="inc")
        ...     return [(e["event"], e["data"]) async for e in chain.astream_events(1)]
        >>> asyncio.run(main())
        [('on_chain_start', {'input': 1}), ('on_chain_stream', {'chunk': 2}), ('on_chain_end', {'output': 2})]
        """
        keep = _event_filter(version, include_names, include_types, include_tags,
                             exclude_names, exclude_types, exclude_tags)
        return _astream_events(self, input, _with_call(config, self, kwargs), keep)

    def stream_events(self, input: Any, config: Optional[RunnableConfig] = None, *,
                      version: str = "v2", include_names: Optional[Sequence[str]] = None,
                      include_types: Optional[Sequence[str]] = None,
                      include_tags: Optional[Sequence[str]] = None,
                      exclude_names: Optional[Sequence[str]] = None,
                      exclude_types: Optional[Sequence[str]] = None,
                      exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> Iterator[Event]:
        """The events `astream_events` yields, synchronously, with no event loop.

        The run executes on a worker thread and its events arrive live; the thread waits
        while 64 events wait for the consumer. Closing the iterator stops the run at its
        next event (a model call waiting on a silent server returns at once) and waits
        until every step has closed. (langchain_core raises here.)

        >>> events = RunnableLambda(str.upper).stream_events("hi", include_types=["chain"])
        >>> [(e["event"], e["data"]) for e in events]
        [('on_chain_start', {'input': 'hi'}), ('on_chain_stream', {'chunk': 'HI'}), ('on_chain_end', {'output': 'HI'})]
        """
        keep = _event_filter(version, include_names, include_types, include_tags,
                             exclude_names, exclude_types, exclude_tags)
        # deviation: langchain_core has no sync stream_events (NotImplementedError)
        return _stream_events(self, input, _with_call(config, self, kwargs), keep)

    def astream_log(self, input: Any, config: Optional[RunnableConfig] = None, *,
                    diff: bool = True, with_streamed_output_list: bool = True,
                    include_names: Optional[Sequence[str]] = None,
                    include_types: Optional[Sequence[str]] = None,
                    include_tags: Optional[Sequence[str]] = None,
                    exclude_names: Optional[Sequence[str]] = None,
                    exclude_types: Optional[Sequence[str]] = None,
                    exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> AsyncIterator[Any]:
        """The run as a log that grows: `RunLogPatch`es of JSON-patch ops on its state.

        The state holds the root's `streamed_output` and `final_output`, and under `logs`
        one entry per step (keyed by name; `name:2` for the second of a name). Filters pick
        which steps get an entry; `diff=False` yields the accumulated `RunLog` instead.
        Built on `astream_events`: the same backpressure and stop.

        >>> async def main():
        ...     chain = RunnableLambda(lambda x: x + 1) | RunnableLambda(lambda x: x * 2)
        ...     log = None
        ...     async for patch in chain.astream_log(1):
        ...         log = patch if log is None else log + patch
        ...     return log.state["final_output"], sorted(log.state["logs"])
        >>> asyncio.run(main())
        (4, ['RunnableLambda', 'RunnableLambda:2'])
        """
        keep = _event_filter("v2", include_names, include_types, include_tags,
                             exclude_names, exclude_types, exclude_tags)
        return _astream_log(self, input, _with_call(config, self, kwargs), keep, diff,
                            with_streamed_output_list)

    def with_config(self, config: Optional[RunnableConfig] = None, **kwargs: Any) -> "Runnable[Input, Output]":
        """This runnable with config bound to every call: run_name, tags, metadata, callbacks…

        Tags and metadata accumulate (applied twice, both sets apply; a deviation from
        langchain_core, which replaces them).

        >>> r = RunnableLambda(lambda x: x).with_config(tags=["a"]).with_config(tags=["b"])
        >>> r.config["tags"]
        ['a', 'b']
        """
        return RunnableBinding(self, _merge_configs({}, {**(config or {}), **kwargs}))

    def bind(self, **kwargs: Any) -> "Runnable[Input, Output]":
        """This runnable with keyword arguments for every call: a model's `stop` or
        `temperature`, a function's extra parameters. Arguments given at call time win.

        >>> RunnableLambda(lambda x, times=1: x * times).bind(times=3).invoke("ab")
        'ababab'
        """
        return RunnableBinding(self, {}, kwargs)

    def assign(self, **steps: Any) -> "Runnable[Any, Any]":
        """`self | RunnablePassthrough.assign(**steps)`: this runnable's dict output with keys
        added, each computed from that dict.

        >>> RunnableLambda(lambda x: {"n": x}).assign(double=lambda d: d["n"] * 2).invoke(4)
        {'n': 4, 'double': 8}
        """
        return RunnableSequence(self, RunnableAssign(RunnableParallel(steps)))

    def pick(self, keys: Union[str, List[str]]) -> "RunnableSequence[Input, Any]":
        """`self | RunnablePick(keys)`: one key's value of this runnable's dict output, or a
        dict of several keys.

        >>> RunnableParallel(a=lambda x: x, b=lambda x: -x).pick("b").invoke(3)
        -3
        """
        return RunnableSequence(self, RunnablePick(keys))

    def with_fallbacks(self, fallbacks: Sequence[Any], *,
                       exceptions_to_handle: Tuple[Type[BaseException], ...] = (Exception,),
                       exception_key: Optional[str] = None) -> "RunnableWithFallbacks[Input, Output]":
        """This runnable, with `fallbacks` tried in turn when it fails (see
        `RunnableWithFallbacks`).

        >>> RunnableLambda(lambda x: 1 / x).with_fallbacks([lambda x: 0.0]).invoke(0)
        0.0
        """
        return RunnableWithFallbacks(self, fallbacks, exceptions_to_handle=exceptions_to_handle,
                                     exception_key=exception_key)

    def with_retry(self, *, retry_if_exception_type: Tuple[Type[BaseException], ...] = (Exception,),
                   wait_exponential_jitter: bool = True,
                   exponential_jitter_params: Optional[Dict[str, float]] = None,
                   stop_after_attempt: int = 3) -> "RunnableRetry[Input, Output]":
        """This runnable, invoked again when it fails (see `RunnableRetry`).

        >>> RunnableLambda(lambda x: x).with_retry(stop_after_attempt=5).max_attempt_number
        5
        """
        return RunnableRetry(self, retry_exception_types=retry_if_exception_type,
                             max_attempt_number=stop_after_attempt,
                             wait_exponential_jitter=wait_exponential_jitter,
                             exponential_jitter_params=exponential_jitter_params)

    def with_listeners(self, *, on_start: Optional[Callable[..., Any]] = None,
                       on_end: Optional[Callable[..., Any]] = None,
                       on_error: Optional[Callable[..., Any]] = None) -> "Runnable[Input, Output]":
        """This runnable with functions called when each of its runs starts, ends or fails,
        with a `RunTree` (and the config, if the function takes two arguments). A function
        that raises is logged and skipped, as any listener.

        >>> seen = []
        >>> r = RunnableLambda(lambda x: x + 1).with_listeners(on_end=lambda run: seen.append(run.outputs))
        >>> r.invoke(1), seen
        (2, [{'output': 2}])
        """
        return RunnableBinding(self, {"callbacks": [_RunTracker(on_start, on_end, on_error)]})

    def pipe(self, *others: Any) -> "RunnableSequence[Input, Any]":
        """`self | others[0] | others[1] ...`

        >>> RunnableLambda(lambda x: x + 1).pipe(lambda x: x * 2).invoke(1)
        4
        """
        return RunnableSequence(self, *others)

    def __or__(self, other: Any) -> "RunnableSequence[Input, Any]":
        return RunnableSequence(self, other)

    def __ror__(self, other: Any) -> "RunnableSequence[Any, Output]":
        return RunnableSequence(other, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _with_call(config: Any, runnable: Any, kwargs: Dict[str, Any]) -> Any:
    """`config` carrying one call's keyword arguments (`stop=...`) for `runnable` alone: the
    runnable finds them with `_call_kwargs`; the runnables it calls, given the same config,
    do not (they are not its target)."""
    if not kwargs:
        return config
    runnable._check_kwargs(kwargs)
    return {**(config or {}), "_kwargs": (runnable, kwargs)}


def _call_kwargs(runnable: Any, config: Mapping[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of the call of `runnable` that `config` carries (see `_with_call`)."""
    given = config.get("_kwargs")
    return cast(Dict[str, Any], given[1]) if given is not None and given[0] is runnable else {}


def _resolve(config: Optional[Mapping[str, Any]], runnable: Any = None,
             kwargs: Optional[Dict[str, Any]] = None) -> RunnableConfig:
    """The effective config of a call: the inherited one (context var) with `config` over it
    (and the call's keyword arguments for `runnable`)."""
    if kwargs:
        return cast(RunnableConfig, _with_call(_resolve(config), runnable, kwargs))
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict like {{'tags': [...]}}, not "
                        f"{type(config).__name__}: {_short(config)}")
    base = _current.get()
    if not config:
        return base if base is not None else {}
    return _merge_configs(base, config)


def ensure_config(config: Optional[RunnableConfig] = None) -> RunnableConfig:
    """The config a call would run with: the inherited one (inside a run), `config` over it,
    and langchain_core's defaults for what neither sets.

    >>> ensure_config({"tags": ["x"]})
    {'tags': ['x'], 'metadata': {}, 'callbacks': None, 'recursion_limit': 25, 'configurable': {}}
    """
    defaults: RunnableConfig = {"tags": [], "metadata": {}, "callbacks": None,
                                "recursion_limit": 25, "configurable": {}}
    return {**defaults, **_resolve(config)}

def _check_inputs(method: str, inputs: Any) -> None:
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{method} takes a list of inputs, not {type(inputs).__name__}: "
                        f"{_short(inputs, 60)}; for one input use "
                        f"{'ainvoke' if method.startswith('a') else 'invoke'}")


def _batch_configs(config: Union[RunnableConfig, List[RunnableConfig], None], n: int) -> List[RunnableConfig]:
    if isinstance(config, list):
        if len(config) != n:
            raise ValueError(f"batch got {len(config)} configs for {n} inputs; pass one config "
                             "or one per input")
        return [_resolve(c) for c in config]
    resolved = _resolve(config)
    if config and config.get("run_id") is not None and n > 1:  # one id names one run
        import warnings
        warnings.warn("Provided run_id be used only for the first element of the batch.",
                      RuntimeWarning, stacklevel=3)
        rest = {k: v for k, v in resolved.items() if k != "run_id"}
        return [resolved] + [rest] * (n - 1)
    return [resolved] * n


# -- the run's plumbing: the active config, input taps, worker threads, sibling stops ------

def _scoped(inner: Iterator[T], config: RunnableConfig) -> Iterator[T]:
    """Run each step of `inner` with `config` as the active config, then restore the caller's.
    Where a sibling failed (`_run_all`), stop at the next chunk."""
    stop = _stop.get()
    try:
        while True:
            if stop is not None and stop.is_set():
                raise _Stopped()
            token = _current.set(config)
            try:
                chunk = next(inner)
            except StopIteration:
                return
            finally:
                _current.reset(token)
            yield chunk
    finally:
        _close(inner)


async def _ascoped(inner: AsyncIterator[T], config: RunnableConfig) -> AsyncIterator[T]:
    """The async twin of `_scoped`, without the stop check: async siblings are cancelled
    instead (`_gather`, `_ainterleave`)."""
    try:
        while True:
            token = _current.set(config)
            try:
                chunk = await inner.__anext__()
            except StopAsyncIteration:
                return
            finally:
                _current.reset(token)
            yield chunk
    finally:
        await _aclose(inner)


def _tap(first: Any, rest: Iterator[Any], run: Run) -> Iterator[Any]:
    """Re-yield the input chunks, folding them for the end event's `input`."""
    try:
        run.input_fold.add(first)
        yield first
        for chunk in rest:
            run.input_fold.add(chunk)
            yield chunk
    finally:  # also when closed at the first chunk: the upstream closes with us
        _close(rest)


async def _atap(first: Any, rest: AsyncIterator[Any], run: Run) -> AsyncIterator[Any]:
    """The async twin of `_tap`."""
    try:
        run.input_fold.add(first)
        yield first
        async for chunk in rest:
            run.input_fold.add(chunk)
            yield chunk
    finally:
        await _aclose(rest)


def _in_thread(make: Callable[[], Iterator[T]], source: "Optional[_SyncInput[Any]]" = None) -> AsyncIterator[T]:
    """Run a blocking iterator on its own worker thread, one `next()` per pull.

    Used where a sync-only step runs under `astream`: the event loop keeps running while the
    step blocks, the context (and so the active run) is copied into the thread, and closing
    the async iterator closes the sync one on its thread before returning. If the step waits
    on its async input (`source`) when we close, that wait is cancelled first, so closing
    does not wait for a stalled upstream.
    """
    import concurrent.futures
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="minichain")

    async def pull() -> AsyncIterator[T]:
        it: Optional[Iterator[T]] = None
        try:
            it = await loop.run_in_executor(pool, ctx.run, make)
            while True:
                chunk = await loop.run_in_executor(pool, ctx.run, _next_or_missing, it)
                if chunk is _MISSING:
                    return
                yield chunk
        finally:
            if source is not None:
                source.abandon()
            if it is not None:
                await asyncio.shield(loop.run_in_executor(pool, ctx.run, _close_quietly, it))
            pool.shutdown(wait=False)
    return pull()


def _next_or_missing(it: Iterator[T]) -> Any:
    return next(it, _MISSING)


def _close_quietly(it: Any) -> None:
    """Close a step that is being abandoned; what it raises on the way out has no one to go to."""
    try:
        _close(it)
    except (Exception, _Stopped):
        pass


class _SyncInput(Iterator[T]):
    """A blocking iterator over an async one, for a sync step running on a worker thread.
    `abandon()` (from the loop) cancels a pending pull: the step sees `_Stopped`."""

    def __init__(self, source: AsyncIterator[T], loop: asyncio.AbstractEventLoop) -> None:
        self.source, self.loop = source, loop
        self.pulling: Any = None  # the pull the worker thread waits on
        self.abandoned = False

    def __next__(self) -> T:
        if self.abandoned:
            raise _Stopped()
        self.pulling = asyncio.run_coroutine_threadsafe(self._pull(), self.loop)
        if self.abandoned:  # abandoned while we set out: `abandon` may have missed this pull
            self.pulling.cancel()
        try:
            return cast(T, self.pulling.result())
        except StopAsyncIteration:
            raise StopIteration from None
        except BaseException:
            if self.abandoned:
                raise _Stopped() from None
            raise

    async def _pull(self) -> T:
        return await self.source.__anext__()

    def abandon(self) -> None:
        self.abandoned = True
        if self.pulling is not None:
            self.pulling.cancel()


def _sync_only(name: str, method: str) -> TypeError:
    # deviation: one TypeError that names the async method to use (langchain_core's errors vary)
    async_method = "/".join("a" + m for m in method.split("/"))  # invoke/stream: ainvoke/astream
    return TypeError(f"{name} is async-only and cannot run in {method}(); use "
                     f"{async_method}() (or await it) instead, or give it a sync function")


class _Stopped(BaseException):
    """Raised inside a run whose consumer went away (or whose sibling failed), to unwind
    every step. A BaseException, so that `except Exception` in user code lets it pass."""


class _StopSignal:
    """Set when a call's sibling failed: the steps running under it stop at their next chunk
    (`_scoped`). A signal set on an enclosing call stops nested ones too."""

    __slots__ = ("flag", "parent")

    def __init__(self, parent: "Optional[_StopSignal]") -> None:
        self.flag, self.parent = False, parent

    def set(self) -> None:
        self.flag = True

    def is_set(self) -> bool:
        signal: Optional[_StopSignal] = self
        while signal is not None:
            if signal.flag:
                return True
            signal = signal.parent
        return False


_stop: "contextvars.ContextVar[Optional[_StopSignal]]" = contextvars.ContextVar(
    "minichain_stop", default=None)


def _run_all(calls: Sequence[Callable[[], T]], workers: int) -> List[T]:
    """Run `calls` on up to `workers` threads, each in a copy of the caller's context, and
    return their results in order. On the first failure the calls not started never start,
    the running ones stop at their next chunk, and the failure is raised once they have:
    no thread outlives the call. (A function blocked inside user code finishes first.)"""
    import concurrent.futures
    if len(calls) == 1:
        return [calls[0]()]
    # deviation: langchain_core's thread pool runs the siblings on after the first failure
    signal = _StopSignal(_stop.get())

    def contained(call: Callable[[], T]) -> T:
        _stop.set(signal)
        return call()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minichain")
    try:
        futures = [pool.submit(contextvars.copy_context().run, contained, call) for call in calls]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None
                  and not isinstance(f.exception(), _Stopped)]
        if failed:
            signal.set()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise cast(BaseException, failed[0].exception())
        return [f.result() for f in futures]
    finally:
        signal.set()
        pool.shutdown(wait=True)


async def _gather(awaitables: Sequence[Awaitable[T]]) -> List[T]:
    """`asyncio.gather`, structured: on the first failure (or if we are cancelled) the others
    are cancelled and awaited before the failure is raised; no task outlives the call."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:  # deviation: langchain_core's gather leaves the siblings running after the error
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    failures = [t.exception() for t in tasks if not t.cancelled()]  # each one retrieved
    for failure in failures:
        if failure is not None:
            raise failure
    return [task.result() for task in tasks]


class RunnableBinding(Runnable[Input, Output]):
    """A runnable with config bound to it (what `with_config` returns).

    The bound config is merged under the call's config; the binding itself is not a run, so
    events show the inner runnable (under `run_name` if one is bound).

    >>> RunnableLambda(lambda x: x).with_config(run_name="echo").invoke("hi")
    'hi'
    """

    def __init__(self, bound: Runnable[Input, Output], config: RunnableConfig,
                 kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.bound, self.config, self.kwargs = bound, config, kwargs or {}
        self._cumulative = bound._cumulative

    def _name(self) -> str:
        return self.bound.get_name()

    def _bind(self, config: RunnableConfig) -> RunnableConfig:
        merged = _merge_configs(self.config, config)
        if "run_name" in self.config and "run_name" not in config:
            merged["run_name"] = self.config["run_name"]
        bound, given = self.config.get("callbacks"), config.get("callbacks")
        if bound and given and bound is not given:  # both listen: neither is dropped
            if isinstance(bound, Run):  # a parent passed on by hand (a tool's `callbacks`) wins
                merged["callbacks"] = bound.adding(given)
            elif isinstance(given, Run):
                merged["callbacks"] = given.adding(bound)
            else:
                merged["callbacks"] = list(given) + list(bound)
        if isinstance(given, Run) and self.config.get("metadata"):
            # inside a run, langchain_core lists the inherited metadata first (values as merged)
            merged["metadata"] = {**config.get("metadata", {}), **merged["metadata"]}
        if self.kwargs or "_kwargs" in config:  # bound keyword arguments, the call's over them
            kwargs = {**self.kwargs, **_call_kwargs(self, config)}
            if kwargs:
                merged["_kwargs"] = (self.bound, kwargs)
        return merged

    def _stream_run(self, inputs: Iterator[Any], config: RunnableConfig, tag: Optional[str] = None,
                    known: Any = _MISSING, invoked: bool = False) -> Iterator[Any]:
        return self.bound._stream_run(inputs, self._bind(config), tag, known, invoked)

    def _astream_run(self, inputs: AsyncIterator[Any], config: RunnableConfig,
                     tag: Optional[str] = None, known: Any = _MISSING,
                     invoked: bool = False) -> AsyncIterator[Any]:
        return self.bound._astream_run(inputs, self._bind(config), tag, known, invoked)

    def _invoked(self, output: Any) -> Any:
        return self.bound._invoked(output)

    def _check_kwargs(self, kwargs: Dict[str, Any]) -> None:
        self.bound._check_kwargs(kwargs)

    def with_config(self, config: Optional[RunnableConfig] = None, **kwargs: Any) -> "Runnable[Input, Output]":
        return RunnableBinding(self.bound, _merge_configs(self.config, {**(config or {}), **kwargs}),
                               self.kwargs)

    def bind(self, **kwargs: Any) -> "Runnable[Input, Output]":
        return RunnableBinding(self.bound, self.config, {**self.kwargs, **kwargs})

    def __repr__(self) -> str:
        bound = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return repr(self.bound) + (f".bind({bound})" if self.kwargs else "") + (
            f".with_config({self.config!r})" if self.config else "")


# ==============================================================================================
# 4. Composition: sequence, parallel, lambda, generator, passthrough, assign, @chain
#
# `|` builds a RunnableSequence, whose transform is its steps' transforms chained: each chunk
# flows through every streaming step before the next is pulled. A dict becomes a parallel step,
# a generator function a streaming step, any other function a step that folds its input.
# ==============================================================================================

def coerce_to_runnable(thing: Any) -> Runnable[Any, Any]:
    """A runnable from a runnable, a dict, a generator function or a callable.

    >>> coerce_to_runnable({"n": len}).get_name()
    'RunnableParallel<n>'
    >>> coerce_to_runnable(42)
    Traceback (most recent call last):
    ...
    TypeError: cannot use int as a step of a chain: 42; a step must be a Runnable, a callable, or a dict of them
    """
    if isinstance(thing, Runnable):
        return thing
    if isinstance(thing, dict):
        return RunnableParallel(thing)
    if inspect.isasyncgenfunction(thing) or inspect.isgeneratorfunction(thing):
        return RunnableGenerator(thing)
    if callable(thing):
        return RunnableLambda(thing)
    raise TypeError(f"cannot use {type(thing).__name__} as a step of a chain: {_short(thing)}; "
                    "a step must be a Runnable, a callable, or a dict of them")


class RunnableSequence(Runnable[Input, Output]):
    """Steps run one after another, each one's output chunks streaming into the next.

    `a | b | c` is the same as `RunnableSequence(a, b, c)`; nested sequences flatten. The
    output streams from the last step that folds its input onward.

    >>> seq = RunnableLambda(lambda x: x + " world") | (lambda s: s.upper())
    >>> seq.invoke("hello"), len(seq.steps)
    ('HELLO WORLD', 2)
    """

    def __init__(self: "RunnableSequence[Any, Any]", *steps: Any, name: Optional[str] = None) -> None:
        flat: List[Runnable[Any, Any]] = []
        for step in steps:
            runnable = coerce_to_runnable(step)
            if type(runnable) is RunnableSequence:
                flat.extend(runnable.steps)
            else:
                flat.append(runnable)
        if len(flat) < 2:
            raise ValueError(f"a RunnableSequence needs at least 2 steps, got {len(flat)}")
        self.steps: List[Runnable[Any, Any]] = flat
        self.name = name
        self._cumulative = flat[-1]._cumulative  # its output is its last step's

    @property
    def first(self) -> Runnable[Any, Any]:
        """The first step."""
        return self.steps[0]

    @property
    def last(self) -> Runnable[Any, Any]:
        """The last step."""
        return self.steps[-1]

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        for i, step in enumerate(self.steps):
            inputs = step._stream_run(inputs, config, f"seq:step:{i + 1}")
        yield from inputs

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        for i, step in enumerate(self.steps):
            inputs = step._astream_run(inputs, config, f"seq:step:{i + 1}")
        try:
            async for chunk in inputs:
                yield chunk
        finally:
            await _aclose(inputs)

    # deviation: `batch` (Runnable's) runs each input through the whole sequence; langchain_core
    # batches step by step. The results are the same.
    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        value = _fold(inputs)
        for i, step in enumerate(self.steps):
            value = step._invoke(value, config, f"seq:step:{i + 1}")
        yield value

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        value = await _afold(inputs)
        for i, step in enumerate(self.steps):
            value = await step._ainvoke(value, config, f"seq:step:{i + 1}")
        yield value

    def __repr__(self) -> str:
        return "\n| ".join(repr(s) for s in self.steps)


class _Tee:
    """Copies of one input iterator, sync or async, for several consumers: a consumer whose
    copy is empty pulls the next item for all, holding `lock` (a thread's lock for `branch`,
    the event loop's for `abranch`)."""

    def __init__(self, source: Any, n: int, lock: Any) -> None:
        import collections
        self.source, self.lock = source, lock
        self.buffers: List[Any] = [collections.deque() for _ in range(n)]

    def _deal(self, i: int, item: Any) -> Any:
        """Give a freshly pulled item to every copy; return copy `i`'s (`_MISSING` at the end)."""
        if item is _MISSING:
            return _MISSING
        for b in self.buffers:
            b.append(item)
        return self.buffers[i].popleft()

    def branch(self, i: int) -> Iterator[Any]:
        buffer = self.buffers[i]
        while True:
            with self.lock:
                chunk = buffer.popleft() if buffer else self._deal(i, next(self.source, _MISSING))
            if chunk is _MISSING:
                return
            yield chunk

    async def abranch(self, i: int) -> AsyncIterator[Any]:
        buffer = self.buffers[i]
        while True:
            async with self.lock:
                chunk = buffer.popleft() if buffer else self._deal(i, await _anext(self.source))
            if chunk is _MISSING:
                return
            yield chunk


def _arrived(done: Iterable[Any], pending: Dict[Any, Tuple[str, Any]],
             branches: List[Tuple[str, Any]]) -> Iterator[Tuple[str, Any, Any]]:
    """`(key, branch, chunk)` for each finished pull (a future or task) in `done`, taken out
    of `pending` in the branches' order (`_MISSING`: that branch ended). The first failed
    pull raises its exception."""
    order = [key for key, _ in branches]
    for pull in sorted(done, key=lambda f: order.index(pending[f][0])):
        key, it = pending.pop(pull)
        yield key, it, pull.result()


def _interleave(branches: List[Tuple[str, Iterator[Any]]]) -> Iterator[Tuple[str, Any]]:
    """`(key, chunk)` pairs from several iterators in the order they arrive. Each branch's
    next chunk is computed on a worker thread while the consumer handles the current one
    (one chunk ahead per branch, no more). The first exception is raised unchanged; closing
    waits for the running steps, then closes every branch."""
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(branches),
                                                 thread_name_prefix="minichain")
    contexts = {key: contextvars.copy_context() for key, _ in branches}
    signal = _StopSignal(_stop.get())  # on a failure or a close, running branches stop
    for context in contexts.values():
        context.run(_stop.set, signal)

    def pull(key: str, it: Iterator[Any]) -> "concurrent.futures.Future[Any]":
        return pool.submit(contexts[key].run, _next_or_missing, it)
    pending = {pull(key, it): (key, it) for key, it in branches}
    try:
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for key, it, chunk in _arrived(done, pending, branches):
                if chunk is not _MISSING:
                    yield key, chunk
                    pending[pull(key, it)] = (key, it)
    finally:
        signal.set()
        concurrent.futures.wait(pending)
        for key, it in branches:
            contexts[key].run(_close, it)
        pool.shutdown()


async def _ainterleave(branches: List[Tuple[str, AsyncIterator[Any]]]) -> AsyncIterator[Tuple[str, Any]]:
    """The async twin of `_interleave`: one task per branch's next chunk; closing cancels
    them and closes every branch."""
    def pull(it: AsyncIterator[Any]) -> "asyncio.Future[Any]":
        return asyncio.ensure_future(_anext(it))
    pending = {pull(it): (key, it) for key, it in branches}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for key, it, chunk in _arrived(done, pending, branches):
                if chunk is not _MISSING:
                    yield key, chunk
                    pending[pull(it)] = (key, it)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for _, it in branches:
            await _aclose(it)


class RunnableParallel(Runnable[Input, Dict[str, Any]]):
    """Branches that each get the same input and run concurrently; the output is a dict.

    Streaming yields one-key dicts (`AddableDict`) as chunks arrive from any branch; they add
    up to the whole output. A dict inside a chain is the same as a RunnableParallel.

    >>> par = RunnableParallel(orig=RunnablePassthrough(), n=len)
    >>> par.invoke("hello"), list(par.stream("hello"))
    ({'orig': 'hello', 'n': 5}, [{'orig': 'hello'}, {'n': 5}])
    """

    def __init__(self: "RunnableParallel[Any]", steps: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        merged = {**(steps or {}), **kwargs}
        if not merged:
            raise ValueError("a RunnableParallel needs at least one branch, e.g. "
                             "RunnableParallel(answer=model)")
        self.steps = {key: coerce_to_runnable(step) for key, step in merged.items()}

    def _name(self) -> str:
        return self.name or f"RunnableParallel<{','.join(self.steps)}>"

    def _chunk(self, key: str, chunk: Any) -> AddableDict:
        """One branch's chunk as a one-key dict; a snapshot-streaming branch's is marked, so
        that folds keep its last snapshot (`_Snapshot`)."""
        return _Snapshot({key: chunk}) if self.steps[key]._cumulative else AddableDict({key: chunk})

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        tee = _Tee(inputs, len(self.steps), threading.Lock())
        branches = [(key, step._stream_run(tee.branch(i), config, f"map:key:{key}"))
                    for i, (key, step) in enumerate(self.steps.items())]
        try:
            if len(branches) == 1:  # nothing to run concurrently
                key, it = branches[0]
                yield from (self._chunk(key, chunk) for chunk in it)
            else:
                for key, chunk in _interleave(branches):
                    yield self._chunk(key, chunk)
        finally:
            _close(inputs)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        tee = _Tee(inputs, len(self.steps), asyncio.Lock())
        branches = [(key, step._astream_run(tee.abranch(i), config, f"map:key:{key}"))
                    for i, (key, step) in enumerate(self.steps.items())]
        merged = _ainterleave(branches)
        try:
            async for key, chunk in merged:
                yield self._chunk(key, chunk)
        finally:
            await _aclose(merged)
            await _aclose(inputs)

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        value = _fold(inputs)

        def branch(key: str, step: Runnable[Any, Any]) -> Callable[[], Any]:
            return lambda: step._invoke(value, config, f"map:key:{key}")
        results = _run_all([branch(k, s) for k, s in self.steps.items()], len(self.steps))
        yield dict(zip(self.steps, results))

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        value = await _afold(inputs)
        results = await _gather([step._ainvoke(value, config, f"map:key:{key}")
                                 for key, step in self.steps.items()])
        yield dict(zip(self.steps, results))


def _accepts_config(func: Callable[..., Any]) -> bool:
    try:
        return "config" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class RunnableLambda(Runnable[Input, Output]):
    """A function as a step. It needs its whole input: the input chunks are folded with `+`
    first, so streaming stops here (a generator function passed explicitly streams its
    output, but still folds its input).

    Sync, async, generator and async generator functions all work; a function with a `config`
    parameter receives the active config; a function returning a runnable has it run on the
    same input. Runnables called inside report as children of this run.

    >>> RunnableLambda(lambda x: x * 2).invoke(21)
    42
    >>> def letters(word):
    ...     yield from word
    >>> list(RunnableLambda(letters).stream("ab"))
    ['a', 'b']
    """

    _user_code = True

    def __init__(self: "RunnableLambda[Any, Any]", func: Callable[..., Any],
                 afunc: Optional[Callable[..., Any]] = None,
                 name: Optional[str] = None) -> None:
        if not callable(func):
            raise TypeError(f"RunnableLambda needs a function, got {type(func).__name__}: "
                            f"{_short(func)}")
        self.func, self.afunc = func, afunc
        fname = getattr(func, "__name__", None)
        self.name = name or (fname if fname and fname != "<lambda>" else None)
        self._config_param = _accepts_config(func)

    def _call(self, func: Callable[..., Any], value: Any, config: RunnableConfig) -> Any:
        kwargs = _call_kwargs(self, config)  # from `bind` or the call
        if not self._config_param:
            return func(value, **kwargs)
        if "_kwargs" in config:  # the function sees a config as it was given
            config = {k: v for k, v in config.items() if k != "_kwargs"}
        return func(value, config=config, **kwargs)

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        func = self.func
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise _sync_only(f"RunnableLambda({self.get_name()})", "invoke/stream")
        out = self._call(func, value, config)
        if inspect.isgenerator(out):
            yield from out
        elif isinstance(out, Runnable):
            yield from out._stream_run(iter([value]), self._deeper(config, value))
        else:
            yield out

    def _deeper(self, config: RunnableConfig, value: Any) -> RunnableConfig:
        """The config for the runnable the function returned: one level of `recursion_limit`
        (default 25) used up, or a RecursionError when none is left (as in langchain_core)."""
        limit = config.get("recursion_limit", 25)
        if limit <= 0:
            raise RecursionError(f"Recursion limit reached when invoking {self!r} with input "
                                 f"{_short(value)}; a function that returns a runnable may nest "
                                 "that deep: raise config['recursion_limit'] if it is meant to")
        return {**config, "recursion_limit": limit - 1}

    async def _aproduce(self, value: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        func = self.afunc or self.func
        if inspect.isasyncgenfunction(func):
            agen = self._call(func, value, config)
            try:
                async for chunk in agen:
                    yield chunk
            finally:
                await agen.aclose()
            return
        if inspect.isgeneratorfunction(func):
            # deviation: langchain_core raises here; we run the generator on a worker thread
            chunks = _in_thread(lambda: cast(Iterator[Any], self._call(func, value, config)))
        elif inspect.iscoroutinefunction(func):
            out = await self._call(func, value, config)
            chunks = _aiter([out]) if not isinstance(out, Runnable) else \
                out._astream_run(_aiter([value]), self._deeper(config, value))
        else:
            ctx = contextvars.copy_context()
            out = await asyncio.get_running_loop().run_in_executor(
                None, ctx.run, self._call, func, value, config)
            chunks = _aiter([out]) if not isinstance(out, Runnable) else \
                out._astream_run(_aiter([value]), self._deeper(config, value))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await _aclose(chunks)

    def __repr__(self) -> str:
        return f"RunnableLambda({self.get_name()})"


def chain(func: Callable[..., Any]) -> RunnableLambda[Any, Any]:
    """Decorator: the function as a `RunnableLambda` named after it.

    Runnables it calls report their events under it, with no config passed by hand.

    >>> @chain
    ... def shout(text):
    ...     return text.upper() + "!"
    >>> shout.invoke("hey"), shout.get_name()
    ('HEY!', 'shout')
    """
    return RunnableLambda(func)


class RunnableGenerator(Runnable[Input, Output]):
    """A generator function over the input *stream* as a step: it sees every input chunk as it
    arrives, so streaming passes through. `|` makes one from any (async) generator function.

    A sync generator function also runs under `astream` (on a worker thread); an async one
    needs the async methods.

    >>> def upper_each(chunks):
    ...     for chunk in chunks:
    ...         yield chunk.upper()
    >>> list(RunnableGenerator(upper_each).transform(iter(["a", "b"])))
    ['A', 'B']
    """

    _user_code = True

    def __init__(self: "RunnableGenerator[Any, Any]", transform: Callable[..., Any],
                 atransform: Optional[Callable[..., Any]] = None,
                 name: Optional[str] = None) -> None:
        for fn in (transform, atransform):
            if fn is None:
                continue
            if not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
                raise TypeError(f"RunnableGenerator needs a generator function (one that "
                                f"yields), got {_short(fn)}; for a plain function use "
                                "RunnableLambda")
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
            if not params:
                raise TypeError(f"generator function {fn.__name__}() must take one argument, "
                                f"the iterator of input chunks: def {fn.__name__}(chunks): ...")
        self.func, self.afunc = transform, atransform
        self.name = name or getattr(transform, "__name__", None)

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        if inspect.isasyncgenfunction(self.func):
            raise _sync_only(f"RunnableGenerator({self.get_name()})", "stream/transform")
        gen = self.func(inputs)
        try:
            yield from gen
        finally:
            _close(inputs)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        func = self.afunc or self.func
        if inspect.isasyncgenfunction(func):
            chunks = func(inputs)
        else:  # deviation: langchain_core raises; we run the sync generator on a worker thread
            source = _SyncInput(inputs, asyncio.get_running_loop())
            chunks = _in_thread(lambda: func(source), source)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await _aclose(chunks)
            await _aclose(inputs)


class RunnablePassthrough(Runnable[Input, Input]):
    """Passes its input through unchanged, chunk by chunk. With `func`, also calls it once
    with the whole input at the end (for side effects).

    >>> RunnableParallel(question=RunnablePassthrough()).invoke("why?")
    {'question': 'why?'}
    """

    def __init__(self: "RunnablePassthrough[Any]", func: Optional[Callable[[Any], Any]] = None) -> None:
        self.func = func

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        seen = _MISSING
        for chunk in inputs:
            if self.func is not None:
                seen = _add(seen, chunk)
            yield chunk
        if self.func is not None and seen is not _MISSING:
            self.func(seen)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        seen = _MISSING
        try:
            async for chunk in inputs:
                if self.func is not None:
                    seen = _add(seen, chunk)
                yield chunk
        finally:
            await _aclose(inputs)
        if self.func is not None and seen is not _MISSING:
            result = self.func(seen)
            if inspect.isawaitable(result):
                await result

    @staticmethod
    def assign(**kwargs: Any) -> "RunnableAssign":
        """A step that passes its dict input through and adds keys computed from it.

        >>> RunnablePassthrough.assign(n=lambda d: len(d["q"])).invoke({"q": "hey"})
        {'q': 'hey', 'n': 3}
        """
        return RunnableAssign(RunnableParallel(kwargs))


class RunnableAssign(Runnable[Dict[str, Any], Dict[str, Any]]):
    """Passes a dict through and adds the keys its mapper computes from the whole dict.

    The input's own keys stream out first, as they arrive; then the mapper's chunks.

    >>> list(RunnableAssign(RunnableParallel(up=lambda d: d["q"].upper())).stream({"q": "hi"}))
    [{'q': 'hi'}, {'up': 'HI'}]
    """

    def __init__(self, mapper: RunnableParallel[Any]) -> None:
        self.mapper = mapper

    def _name(self) -> str:
        return self.name or f"RunnableAssign<{','.join(self.mapper.steps)}>"

    def _passthrough(self, chunk: Any) -> Optional[AddableDict]:
        if not isinstance(chunk, dict):
            raise TypeError(f"{self.get_name()} needs a dict input to add keys to, got "
                            f"{type(chunk).__name__}: {_short(chunk)}")
        kept = AddableDict({k: v for k, v in chunk.items() if k not in self.mapper.steps})
        return kept or None

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        whole = _MISSING
        for chunk in inputs:
            whole = _add(whole, chunk)
            kept = self._passthrough(chunk)
            if kept:
                yield kept
        if whole is not _MISSING:
            yield from self.mapper._stream_run(iter([whole]), config)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        whole = _MISSING
        try:
            async for chunk in inputs:
                whole = _add(whole, chunk)
                kept = self._passthrough(chunk)
                if kept:
                    yield kept
        finally:
            await _aclose(inputs)
        if whole is not _MISSING:
            mapped = self.mapper._astream_run(_aiter([whole]), config)
            try:
                async for chunk in mapped:
                    yield chunk
            finally:
                await _aclose(mapped)


# ==============================================================================================
# 5. Event streaming: astream_events, stream_events, custom events, astream_log
#
# An event stream is the run with one more listener, a `_Channel` (below), that hands each
# event to the consumer as the run makes it. `astream_events` steps the run's coroutine itself,
# so the run moves only when the consumer asks for more (as a generator does); `stream_events`
# runs it on a worker thread that waits while the consumer is behind. Nested calls' events
# arrive live, and a consumer that leaves stops the run at its next chunk.
# ==============================================================================================

_EVENT_WINDOW = 64  # the most events a run on another task or thread gets ahead of its consumer


class _Channel:
    """The listener of an event stream: it hands a run's events to the stream's consumer and
    makes the run wait while the consumer is behind (backpressure).

    Events wait in `buffer` until the consumer takes them. How the run waits depends on where
    its code runs:

    - in the task the consumer drives (`astream_events`): before it pulls its next chunk, a
      run with events waiting hands control to the consumer, as a generator does at `yield`
      (`pause`), so it is never ahead by more than the events of one step;
    - in another task (a parallel branch) or thread (a sync step; `stream_events`' worker):
      it waits once `_EVENT_WINDOW` events are waiting, until the consumer has taken them.

    After `stop` (the consumer left), the run's next event raises `_Stopped` in it.
    """

    def __init__(self, keep: Optional[Callable[[Event], bool]],
                 loop: Optional["asyncio.AbstractEventLoop"] = None) -> None:
        import collections
        self.keep, self.loop = keep, loop
        self.loop_thread = threading.get_ident() if loop is not None else None
        self.buffer: Deque[Event] = collections.deque()
        self.stopped = self.done = False
        self.cond = threading.Condition()  # where threads wait for room, and a sync consumer for events
        self.blocked = 0  # threads waiting for room
        self.paused: List["asyncio.Future[None]"] = []  # tasks waiting for room
        self.waiter: Optional["asyncio.Future[None]"] = None  # the async consumer, asleep
        self.consumer_waits = False  # the sync consumer, asleep
        self.task: Any = None  # the task the consumer drives the run in
        self.closers: List[Callable[[], None]] = []  # unblock a sync step's I/O on stop

    def __call__(self, event: Event) -> None:
        if self.stopped:
            raise _Stopped()
        if self.keep is not None and not self.keep(event):
            return
        buffer = self.buffer
        buffer.append(event)
        if len(buffer) == 1:
            self.wake()
        elif len(buffer) >= _EVENT_WINDOW and threading.get_ident() != self.loop_thread:
            with self.cond:
                self.blocked += 1
                while len(buffer) >= _EVENT_WINDOW and not self.stopped:
                    self.cond.wait()
                self.blocked -= 1
            if self.stopped:
                raise _Stopped()

    def wake(self) -> None:
        """Wake the consumer if it sleeps (it checks the buffer before it sleeps)."""
        if self.consumer_waits:
            with self.cond:
                self.cond.notify_all()
        waiter = self.waiter
        if waiter is not None:
            if threading.get_ident() == self.loop_thread:
                _set_done(waiter)
            else:
                cast(Any, self.loop).call_soon_threadsafe(_set_done, waiter)

    async def pause(self) -> None:
        """A run's checkpoint, before it pulls its next chunk, when events are waiting."""
        if asyncio.current_task() is self.task:
            await _HANDOFF  # back to the consumer, which resumes the run when it wants more
        elif len(self.buffer) >= _EVENT_WINDOW:
            room = cast(Any, self.loop).create_future()
            self.paused.append(room)
            self.wake()
            await room
            if self.stopped:
                raise _Stopped()

    def caught_up(self) -> None:
        """The consumer has taken every event: whoever waits for room goes on."""
        for room in self.paused:
            _set_done(room)
        self.paused.clear()
        if self.blocked:
            with self.cond:
                self.cond.notify_all()

    def stop(self) -> None:
        """The consumer left: release every waiting producer (each raises `_Stopped`) and
        unblock sync steps waiting on I/O."""
        self.stopped = True
        self.caught_up()
        for close in list(self.closers):
            close()


def _set_done(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class _Handoff:
    """Awaited by the run the consumer drives: suspends the whole run up to `astream_events`,
    which hands out the waiting events and resumes the run on the consumer's next request."""

    def __await__(self) -> Any:
        yield self


_HANDOFF = _Handoff()


def _when_stopped(close: Callable[[], None]) -> Callable[[], None]:
    """Register `close` to run if the consumer of the active event stream leaves (so that a
    sync step blocked in I/O returns at once); returns the function that unregisters it."""
    config = _current.get()
    run = config.get("callbacks") if config else None
    channel = run.channel if isinstance(run, Run) else None
    if channel is None:
        return lambda: None
    channel.closers.append(close)
    return lambda: channel.closers.remove(close) if close in channel.closers else None


def _names(kind: str, value: Optional[Sequence[str]]) -> Optional[frozenset]:  # type: ignore[type-arg]
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{kind} must be a list of strings, not the str {value!r}; "
                        f"write {kind}=[{value!r}]")
    return frozenset(value)


def _event_type(event: Event) -> str:
    """The run type an event belongs to (`chat_model`, ...); a custom event's type is its name."""
    kind = event["event"]
    return cast(str, event["name"]) if kind == "on_custom_event" else kind[3:kind.rindex("_")]


def _event_filter(version: str, include_names: Optional[Sequence[str]],
                  include_types: Optional[Sequence[str]], include_tags: Optional[Sequence[str]],
                  exclude_names: Optional[Sequence[str]], exclude_types: Optional[Sequence[str]],
                  exclude_tags: Optional[Sequence[str]]) -> Optional[Callable[[Event], bool]]:
    """A predicate over events from the include/exclude lists (None: keep everything)."""
    # deviation: v2 only, and any other version is a ValueError (langchain_core also has v1)
    if version != "v2":
        raise ValueError(f"unknown event version {version!r}; minichain streams the v2 event "
                         "schema only: pass version='v2' (or leave it out)")
    inc_n, inc_y, inc_t = (_names("include_names", include_names),
                           _names("include_types", include_types),
                           _names("include_tags", include_tags))
    exc_n, exc_y, exc_t = (_names("exclude_names", exclude_names),
                           _names("exclude_types", exclude_types),
                           _names("exclude_tags", exclude_tags))
    if not any(x is not None for x in (inc_n, inc_y, inc_t, exc_n, exc_y, exc_t)):
        return None
    any_include = any(x is not None for x in (inc_n, inc_y, inc_t))

    def keep(event: Event) -> bool:
        name, kind, tags = event["name"], _event_type(event), event["tags"]
        kept = not any_include or bool(
            (inc_n and name in inc_n) or (inc_y and kind in inc_y)
            or (inc_t and not inc_t.isdisjoint(tags)))
        return kept and not ((exc_n and name in exc_n) or (exc_y and kind in exc_y)
                             or (exc_t and not exc_t.isdisjoint(tags)))
    return keep


def _listening(config: Optional[RunnableConfig], listen: Listener) -> RunnableConfig:
    """The call's config with `listen` added to its listeners. A `Run` passed in as
    `callbacks` is dropped, so this call's run is a new root."""
    cfg = dict(_resolve(config))
    listeners = cfg.get("callbacks")
    cfg["callbacks"] = [listen] + (list(listeners) if isinstance(listeners, (list, tuple)) else [])
    return cfg


async def _astream_events(runnable: Runnable[Any, Any], input: Any,
                          config: Optional[RunnableConfig],
                          keep: Optional[Callable[[Event], bool]]) -> AsyncIterator[Event]:
    """The run's events, handed over as it makes them. The run is not a task of its own: this
    generator steps the run's coroutine by hand, as a task would (`send`, then await whatever
    future it awaits), so when the run pauses at a checkpoint (`_Channel.pause`) or its root
    yields a chunk, the waiting events go to the consumer and the run stays suspended until
    the consumer asks for more: nothing piles up, and a consumer that leaves stops it there.
    """
    # deviation: langchain_core runs the chain in a task feeding an unbounded channel
    channel = _Channel(keep, asyncio.get_running_loop())
    chunks = runnable._astream_run(_aiter([input]), _listening(config, channel), None, input)
    context = contextvars.copy_context()  # the run's own context, as a task would have
    pull: Any = None  # the run's current pull (one `__anext__()` of the root), while suspended
    awaited: Any = None  # what the pull yielded: a future it awaits, or `_HANDOFF`
    error: Optional[BaseException] = None  # to throw into the pull where it waits
    failure: Optional[BaseException] = None
    try:
        while True:
            if pull is None:
                pull = chunks.__anext__()
            channel.task = asyncio.current_task()
            try:
                awaited = context.run(pull.send, None) if error is None else \
                    context.run(pull.throw, error)
            except StopIteration:  # the root yielded a chunk (dropped: its consumer
                # has it already, as the root's on_chain_stream event)
                pull = awaited = None
            except StopAsyncIteration:
                pull = None
                break
            except asyncio.CancelledError:  # the run ended on a cancellation: no more events
                pull = None
                raise
            except BaseException as exc:  # the run failed: raised after the events before it
                pull, failure = None, exc
                break
            error = None
            while channel.buffer:
                yield channel.buffer.popleft()
            channel.caught_up()
            if awaited is _HANDOFF or pull is None:  # the consumer had its turn: go on
                continue
            if awaited is None:  # a bare `yield` (asyncio.sleep(0)): let the loop run once
                await asyncio.sleep(0)
                continue
            if not asyncio.isfuture(awaited):  # as a task does: refuse what the loop cannot wait on
                error = RuntimeError(f"a step yielded {_short(awaited)} to the event loop; "
                                     "await only futures, coroutines or tasks")
                continue
            awaited._asyncio_future_blocking = False  # as a task does before it waits
            while not awaited.done():
                try:
                    await _first_of(awaited, channel)
                except asyncio.CancelledError as exc:
                    # Our task was cancelled: by the consumer, or by the run itself (its
                    # asyncio.timeout, its TaskGroup). As a task does, hand it to the run where
                    # it waits, and let the run decide: end, or handle it and go on.
                    if not awaited.cancel():
                        error = exc
                    break
                while channel.buffer:  # events from other tasks and threads, meanwhile
                    yield channel.buffer.popleft()
                channel.caught_up()
        while channel.buffer:
            yield channel.buffer.popleft()
        if failure is not None:
            raise failure
    finally:
        channel.stop()
        if pull is not None:  # the consumer left (or was cancelled) with the run suspended
            await _unwind(pull, awaited, context)
        await _aclose(chunks)


async def _first_of(future: "asyncio.Future[Any]", channel: _Channel) -> None:
    """Wait until `future` is done or an event arrives from another task or thread."""
    waiter = cast(Any, channel.loop).create_future()
    channel.waiter = waiter
    if channel.buffer:
        channel.waiter = None
        return

    def done(_: Any) -> None:
        _set_done(waiter)
    future.add_done_callback(done)
    try:
        await waiter
    finally:
        channel.waiter = None
        future.remove_done_callback(done)


async def _unwind(pull: Any, awaited: Any, context: contextvars.Context) -> None:
    """Cancel a suspended run as a task is cancelled: the future it awaits is cancelled (at a
    handoff, `CancelledError` is thrown in where it waits), and the run is driven on until it
    ends, so that every `finally`, `TaskGroup` and `wait_for` in it has cleaned up."""
    error: Optional[BaseException] = None
    if not (asyncio.isfuture(awaited) and awaited.cancel()):
        error = asyncio.CancelledError()
    while True:
        if asyncio.isfuture(awaited) and not awaited.done():
            await asyncio.wait([awaited])
        try:
            awaited = context.run(pull.throw, error) if error is not None else context.run(pull.send, None)
        except (StopIteration, StopAsyncIteration, _Stopped, asyncio.CancelledError, GeneratorExit):
            return
        error = None
        if asyncio.isfuture(awaited):  # its cleanup awaits: let that finish
            awaited._asyncio_future_blocking = False
        else:
            await asyncio.sleep(0)


class RunLogPatch:
    """Some JSON-patch operations on a run log; patches add up to a `RunLog`.

    >>> a = RunLogPatch({"op": "replace", "path": "", "value": {"logs": {}, "streamed_output": []}})
    >>> b = RunLogPatch({"op": "add", "path": "/streamed_output/-", "value": "hi"})
    >>> (a + b).state
    {'logs': {}, 'streamed_output': ['hi']}
    """

    def __init__(self, *ops: Dict[str, Any]) -> None:
        self.ops = list(ops)

    def __add__(self, other: "RunLogPatch") -> "RunLog":
        ops = self.ops + other.ops
        return RunLog(*ops, state=_apply_ops(None, _copy_ops(ops)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunLogPatch) and type(self) is type(other) and self.ops == other.ops

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        import pprint
        return f"RunLogPatch({pprint.pformat(self.ops)[1:-1]})"


class RunLog(RunLogPatch):
    """The ops so far and the state they build: `state["final_output"]`, `state["logs"]`...

    >>> log = RunLog({"op": "replace", "path": "", "value": {"final_output": None}}, state={"final_output": None})
    >>> (log + RunLogPatch({"op": "replace", "path": "/final_output", "value": 3})).state
    {'final_output': 3}
    """

    def __init__(self, *ops: Dict[str, Any], state: Any) -> None:
        super().__init__(*ops)
        self.state = state

    def __add__(self, other: "RunLogPatch") -> "RunLog":
        import copy
        state = _apply_ops(copy.deepcopy(self.state), _copy_ops(other.ops))
        return RunLog(*self.ops, *other.ops, state=state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunLog) and self.state == other.state

    def __repr__(self) -> str:
        import pprint
        return f"RunLog({pprint.pformat(self.state)})"


def _copy_ops(ops: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ops with their values deep-copied, so applying them shares nothing."""
    import copy
    return [dict(op, value=copy.deepcopy(op["value"])) if "value" in op else dict(op) for op in ops]


def _pointer(path: str) -> List[str]:
    """A JSON pointer's parts (`~1` is `/`, `~0` is `~`)."""
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _apply_ops(state: Any, ops: List[Dict[str, Any]]) -> Any:
    """Apply JSON-patch add/replace/remove ops to `state` (in place where it can)."""
    for op in ops:
        parts = _pointer(op["path"])
        if not parts:
            state = op["value"]
            continue
        target = state
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            if op["op"] == "remove":
                del target[int(last)]
            elif last == "-":
                target.append(op["value"])
            elif op["op"] == "add":
                target.insert(int(last), op["value"])
            else:
                target[int(last)] = op["value"]
        elif op["op"] == "remove":
            del target[last]
        else:
            target[last] = op["value"]
    return state


def _json_diff(old: Any, new: Any, path: str) -> List[Dict[str, Any]]:
    """JSON-patch ops that turn `old` into `new` (dicts key by key, lists by appending)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: List[Dict[str, Any]] = [{"op": "remove", "path": f"{path}/{_escape(k)}"}
                                     for k in old if k not in new]
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            elif old[key] != value:
                ops += _json_diff(old[key], value, f"{path}/{_escape(key)}")
        return ops
    if isinstance(old, list) and isinstance(new, list) and new[:len(old)] == old:
        return [{"op": "add", "path": f"{path}/{i}", "value": v}
                for i, v in enumerate(new[len(old):], len(old))]
    return [] if old == new else [{"op": "replace", "path": path, "value": new}]


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")  # as langchain_core writes it


def _log_output(kind: str, output: Any) -> Any:
    """A step's output as langchain_core's run log stores it."""
    if kind == "chat_model":
        message = output
        return {"generations": [[{"text": _text_of(message), "generation_info": None,
                                  "type": "ChatGenerationChunk" if isinstance(message, AIMessageChunk)
                                  else "ChatGeneration", "message": message}]],
                "llm_output": None, "run": None, "type": "LLMResult"}
    if kind == "llm":
        return {**output, "run": None, "type": "LLMResult"}
    if kind == "retriever":
        return {"documents": output}
    if kind == "prompt" or isinstance(output, dict):
        return output
    return {"output": output}


class _RunLogger:
    """Turns events into run-log patches, one patch per event (None where nothing changes)."""

    def __init__(self, keep: Optional[Callable[[Event], bool]], streamed_list: bool,
                 cumulative: bool = False) -> None:
        self.keep, self.streamed_list = keep, streamed_list
        self.cumulative = cumulative  # the root streams snapshots: the last is the output
        self.keys: Dict[str, str] = {}  # run id -> its key under /logs
        self.names: Dict[str, int] = {}  # how many entries each name has
        self.final: Any = _MISSING

    def __call__(self, event: Event) -> Optional[RunLogPatch]:
        kind, phase = _event_type(event), event["event"].rsplit("_", 1)[-1]
        shown_kind = "llm" if kind == "chat_model" else kind
        if event["event"] == "on_custom_event":
            return None
        if not event["parent_ids"]:
            if phase == "start":
                return RunLogPatch({"op": "replace", "path": "", "value": {
                    "id": event["run_id"], "streamed_output": [], "final_output": None,
                    "logs": {}, "name": event["name"], "type": shown_kind}})
            return self._root_chunk(event["data"]["chunk"]) if phase == "stream" else None
        if phase == "start":
            if self.keep is not None and not self.keep(event):
                return None
            count = self.names[event["name"]] = self.names.get(event["name"], 0) + 1
            key = self.keys[event["run_id"]] = event["name"] if count == 1 else f"{event['name']}:{count}"
            return RunLogPatch({"op": "add", "path": f"/logs/{_escape(key)}", "value": {
                "id": event["run_id"], "name": event["name"], "type": shown_kind,
                "tags": event["tags"], "metadata": event["metadata"], "start_time": _now(),
                "streamed_output": [], "streamed_output_str": [], "final_output": None,
                "end_time": None}})
        key = self.keys.get(event["run_id"])
        if key is None:
            return None
        at = f"/logs/{_escape(key)}"
        if phase == "stream":
            chunk = event["data"]["chunk"]
            ops = [{"op": "add", "path": f"{at}/streamed_output/-", "value": chunk}]
            if shown_kind == "llm":
                text = chunk.text if isinstance(chunk, BaseMessage) else str(chunk)
                ops.insert(0, {"op": "add", "path": f"{at}/streamed_output_str/-", "value": text})
            return RunLogPatch(*ops)
        if phase == "end":
            return RunLogPatch(
                {"op": "add", "path": f"{at}/final_output",
                 "value": _log_output(kind, event["data"]["output"])},
                {"op": "add", "path": f"{at}/end_time", "value": _now()})
        return None

    def _root_chunk(self, chunk: Any) -> RunLogPatch:
        ops = [{"op": "add", "path": "/streamed_output/-", "value": chunk}] if self.streamed_list else []
        if self.final is _MISSING or self.cumulative:
            self.final = chunk
            ops.append({"op": "replace", "path": "/final_output", "value": chunk})
            return RunLogPatch(*ops)
        try:
            new = self.final + chunk
        except TypeError:
            new = chunk
            ops.append({"op": "replace", "path": "/final_output", "value": chunk})
        else:
            ops += _json_diff(self.final, new, "/final_output")
        self.final = new
        return RunLogPatch(*ops)


async def _astream_log(runnable: Runnable[Any, Any], input: Any, config: Optional[RunnableConfig],
                       keep: Optional[Callable[[Event], bool]], diff: bool,
                       streamed_list: bool) -> AsyncIterator[Any]:
    logger = _RunLogger(keep, streamed_list, runnable._cumulative)
    events = _astream_events(runnable, input, config, None)
    log: Optional[RunLog] = None
    try:
        async for event in events:
            patch = logger(event)
            if patch is None or not patch.ops:
                continue
            if diff:
                yield patch
            else:
                log = RunLog(*patch.ops, state=_apply_ops(None, _copy_ops(patch.ops))) \
                    if log is None else log + patch
                yield log
    finally:
        await _aclose(events)


def _stream_events(runnable: Runnable[Any, Any], input: Any, config: Optional[RunnableConfig],
                   keep: Optional[Callable[[Event], bool]]) -> Iterator[Event]:
    """The sync event stream: the run executes on a worker thread, which waits whenever
    `_EVENT_WINDOW` events wait for the consumer; closing stops it at its next event (and
    unblocks a model call waiting on its server) and waits until every step has closed."""
    channel = _Channel(keep)
    failure: List[BaseException] = []

    def run() -> None:
        chunks = runnable._stream_run(iter([input]), _listening(config, channel), None, input)
        try:
            for _ in chunks:
                if channel.stopped:
                    break
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the consumer, raised there
            failure.append(exc)
        finally:
            try:
                _close(chunks)
            finally:
                with channel.cond:
                    channel.done = True
                    channel.cond.notify_all()
    worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True,
                              name="minichain-events")
    worker.start()
    buffer = channel.buffer
    try:
        while True:
            with channel.cond:
                channel.caught_up()
                channel.consumer_waits = True  # before looking: an event after this wakes us
                while not buffer and not channel.done:
                    channel.cond.wait()
                channel.consumer_waits = False
            if not buffer:
                break
            while buffer:
                yield buffer.popleft()
        if failure and not channel.stopped:
            raise failure[0]
    finally:
        channel.stop()
        worker.join()


def _custom_event(name: str, data: Any, config: Optional[RunnableConfig]) -> Optional[Run]:
    cfg = config if config is not None else _current.get()
    if cfg is None:
        raise RuntimeError(f"dispatch_custom_event({name!r}) was called outside any runnable; "
                           "call it from inside a step (a RunnableLambda, @chain, tool, ...) so "
                           "the event has a parent run")
    run = cfg.get("callbacks")
    if not isinstance(run, Run):
        return None
    run.emit({"event": "on_custom_event", "run_id": run.id, "name": name,
              "tags": run.inherited_tags, "metadata": run.metadata, "data": data,
              "parent_ids": run.parent_ids})
    return run


def dispatch_custom_event(name: str, data: Any, config: Optional[RunnableConfig] = None) -> None:
    """Emit an `on_custom_event` under the run that is executing (found via the context).

    Listeners see `name` and `data` as given; with no listener it costs nothing.

    >>> @chain
    ... def step(x):
    ...     dispatch_custom_event("progress", {"done": 50})
    ...     return x
    >>> [(e["event"], e["name"], e["data"]) for e in step.stream_events(1, include_types=["progress"])]
    [('on_custom_event', 'progress', {'done': 50})]
    """
    run = _custom_event(name, data, config)
    if run is not None and run.pending:
        run.refuse_async()


async def adispatch_custom_event(name: str, data: Any, config: Optional[RunnableConfig] = None) -> None:
    """Async twin of `dispatch_custom_event`.

    >>> async def step(x):
    ...     await adispatch_custom_event("progress", "half")
    ...     return x
    >>> async def main():
    ...     events = RunnableLambda(step).astream_events(1, include_types=["progress"])
    ...     return [e["data"] async for e in events]
    >>> asyncio.run(main())
    ['half']
    """
    run = _custom_event(name, data, config)
    if run is not None:
        await run.settle()
        if run.channel is not None and run.channel.buffer:  # backpressure, as at a chunk
            await run.channel.pause()


# ==============================================================================================
# 6. Prompts: values and templates
#
# What a prompt produces: a string for an LLM, messages for a chat model. A prompt template
# turns a dict of variables into a prompt value; it needs its whole input, so it is where a
# chain's input stream is folded. Templates use `{name}`; `{{` and `}}` are braces.
# ==============================================================================================

class PromptValue:
    """What a prompt produces; a model reads it as a string or as messages.

    >>> value = ChatPromptTemplate.from_template("hi {name}").invoke({"name": "Ann"})
    >>> isinstance(value, PromptValue), value.to_string(), value.to_messages()
    (True, 'Human: hi Ann', [HumanMessage(content='hi Ann')])
    """

    def to_string(self) -> str:
        """The prompt as one string."""
        raise NotImplementedError

    def to_messages(self) -> List[BaseMessage]:
        """The prompt as a list of messages."""
        raise NotImplementedError


class StringPromptValue(PromptValue):
    """A prompt that is one string.

    >>> StringPromptValue("Q: why?").to_messages()
    [HumanMessage(content='Q: why?')]
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def to_string(self) -> str:
        return self.text

    def to_messages(self) -> List[BaseMessage]:
        return [HumanMessage(self.text)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StringPromptValue) and self.text == other.text

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringPromptValue(text={self.text!r})"


class ChatPromptValue(PromptValue):
    """A prompt that is a list of messages.

    >>> ChatPromptValue([SystemMessage("s"), HumanMessage("h")]).to_string()
    'System: s\\nHuman: h'
    """

    def __init__(self, messages: List[BaseMessage]) -> None:
        self.messages = messages

    def to_string(self) -> str:
        def role(m: BaseMessage) -> str:
            return m.role if isinstance(m, ChatMessage) else "AI" if m.type == "ai" else m.type.capitalize()
        return "\n".join(f"{role(m)}: {m.text}" for m in self.messages)

    def to_messages(self) -> List[BaseMessage]:
        return list(self.messages)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatPromptValue) and self.messages == other.messages

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ChatPromptValue(messages={self.messages!r})"


def _variables(template: str) -> List[str]:
    """The `{name}` variables of a template, in order of first use.

    A field is a plain name: attribute access and indexing (`{doc.metadata}`, `{docs[0]}`)
    are refused when the template is built, since a template that reaches into its values
    can read anything they lead to (`{x.__init__.__globals__[os].environ}`), as
    langchain_core refuses them.

    >>> _variables("{a} and {b!r:>{width}}")
    ['a', 'b', 'width']
    >>> _variables("{docs[0].page_content}")
    Traceback (most recent call last):
    ...
    ValueError: template field '{docs[0].page_content}' uses indexing or attribute access, which templates refuse (a template must not reach into its values); use a plain name like '{docs}' and prepare the value before the prompt, e.g. with RunnablePassthrough.assign(docs=...)
    """
    import string
    names: List[str] = []
    specs = [template]
    while specs:  # a format spec may hold fields of its own: `{x:>{width}}`
        for _, field, spec, _ in string.Formatter().parse(specs.pop()):
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not name or name.isdigit():
                raise ValueError(f"template {_short(template)} has a positional placeholder "
                                 f"'{{{_short(field, 40)[1:-1] if field else ''}}}'; name it, like "
                                 "'{topic}'")
            if name != field:
                raise ValueError(
                    f"template field {_short('{' + field + '}', 60)} uses indexing or attribute "
                    "access, which templates refuse (a template must not reach into its "
                    f"values); use a plain name like '{{{_short(name, 40)[1:-1]}}}' and prepare "
                    "the value before the prompt, e.g. with RunnablePassthrough.assign("
                    f"{_short(name, 40)[1:-1]}=...)")
            if name not in names:
                names.append(name)
            if spec:
                specs.append(spec)
    return names


class _MissingVariables(KeyError):
    """A KeyError (as in langchain_core) whose message reads as plain text."""

    def __str__(self) -> str:
        return str(self.args[0])


def _check_variables(owner: str, expected: List[str], values: Any) -> None:
    if not isinstance(values, dict):
        raise TypeError(f"{owner} expects a dict of variables {expected}, got "
                        f"{type(values).__name__}: {_short(values)}; pass e.g. "
                        f"{{{expected[0]!r}: ...}}" if expected else
                        f"{owner} expects a dict, got {type(values).__name__}")
    missing = [v for v in expected if v not in values]
    if missing:
        # deviation: the KeyError names the missing variables, the expected ones and the fix
        raise _MissingVariables(
            f"{owner} is missing variable{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}; the template expects {expected} and got "
            f"{sorted(values)}; pass {{{', '.join(f'{m!r}: ...' for m in missing)}}} "
            f"(or write '{{{{{missing[0]}}}}}' for a literal brace)")



class _Prompt(Runnable[Any, PromptValue]):
    """What both prompt templates share: variable checking, partial values, the prompt run type."""

    run_type = "prompt"
    input_in_start = True
    input_variables: List[str] = []
    partial_variables: Dict[str, Any] = {}

    def _values(self, value: Any) -> Dict[str, Any]:
        if not isinstance(value, dict) and len(self.input_variables) == 1:
            return {self.input_variables[0]: value}  # one variable: the input is its value
        _check_variables(type(self).__name__, self.input_variables, value)
        return cast(Dict[str, Any], value)

    def _filled(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The variables given, checked, over the partial values (a function is called now)."""
        _check_variables(type(self).__name__, self.input_variables, kwargs)
        if not self.partial_variables:
            return kwargs
        return {**{k: v() if callable(v) else v for k, v in self.partial_variables.items()}, **kwargs}

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[PromptValue]:
        yield self.format_prompt(**self._values(value))

    def format_prompt(self, **kwargs: Any) -> PromptValue:
        """The prompt value for these variables."""
        raise NotImplementedError

    def partial(self: _P, **values: Any) -> _P:
        """A copy of this prompt with some variables filled in, each by a value or by a function
        called for it at every format. Variables given when formatting win over them.

        >>> prompt = PromptTemplate.from_template("{greeting}, {name}").partial(greeting="Hi")
        >>> prompt.input_variables, prompt.format(name="Ada")
        (['name'], 'Hi, Ada')
        """
        import copy
        new = copy.copy(self)
        new.partial_variables = {**self.partial_variables, **values}
        new.input_variables = [v for v in self.input_variables if v not in values]
        return new


_P = TypeVar("_P", bound=_Prompt)


class PromptTemplate(_Prompt):
    """A string template: variables in, a `StringPromptValue` out. `a + b` joins two templates
    (or a template and a string), keeping the partial values of both.

    >>> PromptTemplate.from_template("Q: {question}").invoke({"question": "why?"})
    StringPromptValue(text='Q: why?')
    >>> (PromptTemplate.from_template("{a} and ") + "{b}").format(a=1, b=2)
    '1 and 2'
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.input_variables = _variables(template)

    @classmethod
    def from_template(cls, template: str) -> "PromptTemplate":
        """A prompt from a `{name}` template."""
        return cls(template)

    def format(self, **kwargs: Any) -> str:
        """The template filled in.

        >>> PromptTemplate.from_template("{a}+{a}={b}").format(a=1, b=2)
        '1+1=2'
        """
        return self.template.format(**self._filled(kwargs))

    def format_prompt(self, **kwargs: Any) -> PromptValue:
        return StringPromptValue(self.format(**kwargs))

    def __add__(self, other: Any) -> "PromptTemplate":
        if isinstance(other, str):
            other = PromptTemplate(other)
        if not isinstance(other, PromptTemplate):
            return NotImplemented
        return PromptTemplate(self.template + other.template).partial(
            **{**self.partial_variables, **other.partial_variables})

    def __repr__(self) -> str:
        return f"PromptTemplate.from_template({self.template!r})"


def _add_to_chat(self: Any, other: Any) -> Any:
    """`part + other` for the parts of a chat prompt: a chat prompt of both."""
    return ChatPromptTemplate([self]).__add__(other)


def _message_before(self: Any, other: Any) -> Any:
    """`message + part`: a chat prompt of both (a string or tuple before it stays an error)."""
    return ChatPromptTemplate([other]).__add__(self) if isinstance(other, BaseMessage) else NotImplemented


class MessagesPlaceholder:
    """Where a list of messages from the input goes in a chat prompt; with `optional=True` the
    variable may be left out.

    >>> prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{q}")])
    >>> prompt.invoke({"history": [("ai", "hello")], "q": "hi"}).to_messages()
    [AIMessage(content='hello'), HumanMessage(content='hi')]
    """

    def __init__(self, variable_name: str, optional: bool = False) -> None:
        self.variable_name, self.optional = variable_name, optional

    def format_messages(self, **kwargs: Any) -> List[BaseMessage]:
        """The messages of the variable (none if it is optional and absent)."""
        value = kwargs.get(self.variable_name, [] if self.optional else _MISSING)
        if value is _MISSING:
            raise _MissingVariables(f"MessagesPlaceholder is missing variable "
                                    f"{self.variable_name!r}; pass a list of messages under it")
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"MessagesPlaceholder {self.variable_name!r} needs a list of "
                            f"messages, got {type(value).__name__}: {_short(value)}")
        return [_to_message(m) for m in value]

    __add__, __radd__ = _add_to_chat, _message_before

    def __repr__(self) -> str:
        optional = ", optional=True" if self.optional else ""
        return f"MessagesPlaceholder(variable_name={self.variable_name!r}{optional})"


class _MessageTemplate:
    """A template for one message of one role; the three public classes differ only in it."""

    role = "human"

    def __init__(self, prompt: PromptTemplate) -> None:
        self.prompt = prompt

    @classmethod
    def from_template(cls: type[_M], template: str,
                      partial_variables: Optional[Dict[str, Any]] = None) -> _M:
        """A message template from a `{name}` template (and values for some variables)."""
        return cls(PromptTemplate(template).partial(**(partial_variables or {})))

    @property
    def input_variables(self) -> List[str]:
        """The variables the template needs."""
        return self.prompt.input_variables

    def format(self, **kwargs: Any) -> BaseMessage:
        """The message, with the variables filled in."""
        _check_variables(type(self).__name__, self.input_variables, kwargs)
        return _to_message((self.role, self.prompt.format(**kwargs)))

    def format_messages(self, **kwargs: Any) -> List[BaseMessage]:
        """`[format(**kwargs)]`: the message as a list, as every part of a chat prompt gives."""
        return [self.format(**kwargs)]

    __add__, __radd__ = _add_to_chat, _message_before

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_template({self.prompt.template!r})"


_M = TypeVar("_M", bound=_MessageTemplate)


class SystemMessagePromptTemplate(_MessageTemplate):
    """A template for a system message; `a + b` with another part makes a chat prompt.

    >>> SystemMessagePromptTemplate.from_template("You like {topic}.").format(topic="cats")
    SystemMessage(content='You like cats.')
    """
    role = "system"


class HumanMessagePromptTemplate(_MessageTemplate):
    """A template for a human message.

    >>> HumanMessagePromptTemplate.from_template("Tell me about {topic}.").format_messages(topic="cats")
    [HumanMessage(content='Tell me about cats.')]
    """
    role = "human"


class AIMessagePromptTemplate(_MessageTemplate):
    """A template for an AI message (an example answer, say).

    >>> (AIMessagePromptTemplate.from_template("{a}") + "{q}").format_messages(a="Meow.", q="Again?")
    [AIMessage(content='Meow.'), HumanMessage(content='Again?')]
    """
    role = "ai"


_MessageLike = Union[BaseMessage, MessagesPlaceholder, _MessageTemplate, Tuple[str, str], str]


class ChatPromptTemplate(_Prompt):
    """A chat template: variables in, a `ChatPromptValue` of messages out.

    `a + b` is one chat prompt of both, where `b` is a chat prompt, a message template, a
    message, a placeholder, a `(role, template)` tuple, a string (a human message) or a list
    of these; partial values carry over.

    >>> prompt = ChatPromptTemplate.from_messages([("system", "You like {topic}."), ("human", "{q}")])
    >>> prompt.invoke({"topic": "cats", "q": "hi"})
    ChatPromptValue(messages=[SystemMessage(content='You like cats.'), HumanMessage(content='hi')])
    >>> prompt.invoke({"topic": "cats"})
    Traceback (most recent call last):
    ...
    minichain._MissingVariables: ChatPromptTemplate is missing variable 'q'; the template expects ['topic', 'q'] and got ['topic']; pass {'q': ...} (or write '{{q}}' for a literal brace)
    >>> (prompt + ("ai", "{a}")).format_messages(topic="cats", q="hi", a="meow")[-1]
    AIMessage(content='meow')
    """

    def __init__(self, messages: Sequence[_MessageLike]) -> None:
        self.messages: List[Any] = []
        variables: List[str] = []
        for item in messages:
            if isinstance(item, str):
                item = ("human", item)
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "placeholder":
                item = MessagesPlaceholder(item[1].strip("{}"), optional=True)
            if isinstance(item, MessagesPlaceholder):
                names = [] if item.optional else [item.variable_name]
            elif isinstance(item, BaseMessage):
                names = []
            elif isinstance(item, _MessageTemplate):
                names = item.input_variables
            elif isinstance(item, tuple) and len(item) == 2:
                _to_message((item[0], ""))  # checks the role
                names = _variables(item[1])
            else:
                raise TypeError(f"cannot use {_short(item)} in a chat prompt; use a (role, "
                                "template) tuple, a message, a message template or a MessagesPlaceholder")
            self.messages.append(item)
            # deviation: input_variables in order of appearance (langchain_core sorts them)
            variables += [n for n in names if n not in variables]
        self.input_variables = variables

    @classmethod
    def from_messages(cls, messages: Sequence[_MessageLike]) -> "ChatPromptTemplate":
        """A chat prompt from `(role, template)` tuples, messages, message templates and placeholders."""
        return cls(messages)

    @classmethod
    def from_template(cls, template: str) -> "ChatPromptTemplate":
        """A chat prompt of one human message.

        >>> ChatPromptTemplate.from_template("tell me a joke about {topic}").input_variables
        ['topic']
        """
        return cls([("human", template)])

    def format_messages(self, **kwargs: Any) -> List[BaseMessage]:
        """The messages with the variables filled in."""
        kwargs = self._filled(kwargs)
        out: List[BaseMessage] = []
        for item in self.messages:
            if isinstance(item, (MessagesPlaceholder, _MessageTemplate)):
                out += item.format_messages(**kwargs)
            elif isinstance(item, BaseMessage):
                out.append(item)
            else:
                out.append(_to_message((item[0], item[1].format(**kwargs))))
        return out

    def format_prompt(self, **kwargs: Any) -> PromptValue:
        return ChatPromptValue(self.format_messages(**kwargs))

    def __add__(self, other: Any) -> "ChatPromptTemplate":
        partials = self.partial_variables
        if isinstance(other, ChatPromptTemplate):
            items, partials = other.messages, {**partials, **other.partial_variables}
        elif isinstance(other, list):
            items = other
        elif isinstance(other, (str, tuple, BaseMessage, MessagesPlaceholder, _MessageTemplate)):
            # deviation: a (role, template) tuple is one message (langchain_core takes any
            # tuple for a list of messages: ("ai", "hi") would add two human messages)
            items = [other]
        else:  # deviation: a TypeError, as Python gives (langchain_core: NotImplementedError)
            return NotImplemented
        return ChatPromptTemplate(self.messages + items).partial(**partials)

    __radd__ = _message_before


# ==============================================================================================
# 7. Chat models, LLMs and fakes
#
# A chat model writes `_stream(messages)` (and `_astream` if it does real async I/O). The base
# class folds its input into messages, stamps each chunk with the run's id, marks the last
# chunk, and reports `on_chat_model_*` events. The fakes make docs and tests deterministic.
# ==============================================================================================

def _to_messages(value: Any) -> List[BaseMessage]:
    """A chat model's input as messages: a string, a prompt value or a list of messages (or
    `{"messages": [...]}`, the chat prompt value as LangServe sends it)."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, dict) and list(value) == ["messages"]:
        value = value["messages"]
    if isinstance(value, (str, BaseMessage)):
        return [_to_message(value)]
    if isinstance(value, (list, tuple)):
        return [_to_message(item) for item in value]
    raise TypeError(f"a chat model takes a str, a list of messages or a prompt value, not "
                    f"{type(value).__name__}: {_short(value)}")


def _run_id(config: RunnableConfig) -> str:
    """The id of the run executing (a fresh one when nobody listens)."""
    run = config.get("callbacks")
    return run.id if isinstance(run, Run) else _uuid7()


def _closing(last: Optional[AIMessageChunk]) -> List[AIMessageChunk]:
    """What a model's stream ends with: nothing if its last chunk says it is the last, else an
    empty chunk that does; no chunks at all is an error (as in langchain_core)."""
    if last is None:
        raise ValueError("No generation chunks were returned: the model streamed nothing")
    return [] if last.chunk_position == "last" else [
        AIMessageChunk("", id=last.id, chunk_position="last")]


class BaseChatModel(Runnable[Any, AIMessage]):
    """A chat model: messages in, `AIMessageChunk`s out. Subclasses write `_stream`.

    It needs its whole input (a prompt is folded first), then streams tokens; `invoke`
    returns the chunks added up as an `AIMessage`.

    >>> class Echo(BaseChatModel):
    ...     def _stream(self, messages, **kwargs):
    ...         for word in messages[-1].text.split():
    ...             yield AIMessageChunk(word)
    >>> Echo().invoke("hi there").content
    'hithere'
    """

    run_type = "chat_model"
    input_in_start = True

    def __init__(self, *, tags: Optional[List[str]] = None,
                 metadata: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.tags, self.metadata = list(tags or []), dict(metadata or {})
        self.kwargs = kwargs  # extra request parameters passed to _stream

    def _stream(self, messages: List[BaseMessage], **kwargs: Any) -> Iterator[AIMessageChunk]:
        """The model's answer to `messages`, chunk by chunk."""
        raise NotImplementedError(f"{type(self).__name__} must implement _stream(messages)")

    def _astream(self, messages: List[BaseMessage], **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        """Async twin of `_stream`; by default runs `_stream` on a worker thread."""
        return _in_thread(lambda: self._stream(messages, **kwargs))

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        # deviation: invoke's message keeps this id too (langchain_core adds -0 with no listener)
        run_id, last = f"lc_run--{_run_id(config)}", None
        for last in self._stream(_to_messages(value), **{**self.kwargs, **_call_kwargs(self, config)}):
            if last.id is None:
                last.id = run_id  # every chunk of a call carries the run's id
            yield last
        yield from _closing(last)

    async def _aproduce(self, value: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        run_id, last = f"lc_run--{_run_id(config)}", None
        chunks = self._astream(_to_messages(value), **{**self.kwargs, **_call_kwargs(self, config)})
        try:
            async for last in chunks:
                if last.id is None:
                    last.id = run_id
                yield last
        finally:
            await _aclose(chunks)
        for closing in _closing(last):
            yield closing

    def _invoked(self, output: Any) -> Any:
        return output.to_message() if isinstance(output, AIMessageChunk) else output

    if TYPE_CHECKING:  # streams yield chunks; invoke returns the whole AIMessage
        def stream(self, input: Any, config: Optional[RunnableConfig] = None,
                   **kwargs: Any) -> Iterator[AIMessageChunk]: ...

        def astream(self, input: Any, config: Optional[RunnableConfig] = None,
                    **kwargs: Any) -> AsyncIterator[AIMessageChunk]: ...

    def _event_input(self, value: Any, end: bool) -> Any:
        return {"messages": [_to_messages(value)]}

    def _own_tags(self) -> List[str]:
        return self.tags

    def _own_metadata(self, config: RunnableConfig) -> Dict[str, Any]:
        name = type(self).__name__
        provider = name[4:] if name.startswith("Chat") else name[:-4] if name.endswith("Chat") else name
        return {**_ls_params(self, provider.lower(), "chat", _call_kwargs(self, config)),
                "ls_integration": "langchain_chat_model", **self.metadata}


class BaseLLM(Runnable[Any, str]):
    """A text-completion model: a prompt string in, text out. Subclasses write `_call`, or
    `_stream` to stream; only a model with `_stream` emits `on_llm_stream` events.

    >>> class Shout(BaseLLM):
    ...     def _call(self, prompt, **kwargs):
    ...         return prompt.upper()
    >>> Shout().invoke("hey")
    'HEY'
    """

    run_type = "llm"
    input_in_start = True

    def __init__(self, *, tags: Optional[List[str]] = None,
                 metadata: Optional[Dict[str, Any]] = None) -> None:
        self.tags, self.metadata = list(tags or []), dict(metadata or {})
        self.kwargs: Dict[str, Any] = {}  # extra parameters passed to _stream

    def _call(self, prompt: str, **kwargs: Any) -> str:
        """The whole completion of `prompt`."""
        return "".join(self._stream(prompt, **kwargs))

    def _stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """The completion of `prompt`, piece by piece (default: `_call` in one piece)."""
        yield self._call(prompt, **kwargs)

    def _streams(self, invoked: bool) -> bool:
        return type(self)._stream is not BaseLLM._stream

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        # deviation: the chunks are strings, in events too (langchain_core wraps a child LLM's
        # chunks in GenerationChunk)
        yield from self._stream(_to_prompt(value), **{**self.kwargs, **_call_kwargs(self, config)})

    def _event_input(self, value: Any, end: bool) -> Any:
        return {"prompts": [_to_prompt(value)]}

    def _event_output(self, output: Any) -> Any:
        return {"generations": [[{"text": output, "generation_info": None, "type": "Generation"}]],
                "llm_output": None}

    def _own_tags(self) -> List[str]:
        return self.tags

    def _own_metadata(self, config: RunnableConfig) -> Dict[str, Any]:
        name = type(self).__name__
        provider = (name[:-3] if name.endswith("LLM") else name).lower()
        return {**_ls_params(self, provider, "llm", _call_kwargs(self, config)), **self.metadata}


def _ls_params(model: Any, provider: str, model_type: str, call: Dict[str, Any]) -> Dict[str, Any]:
    """The `ls_*` metadata a model's events carry: its provider and type, and the stop
    sequences, model name, temperature and token limit of the call where it has them."""
    # deviation: no lc_versions (minichain is not langchain-core)
    params: Dict[str, Any] = {"ls_provider": provider, "ls_model_type": model_type}
    kwargs = {**model.kwargs, **call}
    if kwargs.get("stop"):
        params["ls_stop"] = kwargs["stop"]
    for key, types in (("model", str), ("temperature", (int, float)), ("max_tokens", int)):
        value = kwargs.get(key, getattr(model, key, None))
        if isinstance(value, types) and not isinstance(value, bool):
            params["ls_model_name" if key == "model" else f"ls_{key}"] = value
    return params


def _to_prompt(value: Any) -> str:
    if isinstance(value, PromptValue):
        return value.to_string()
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ChatPromptValue(_to_messages(value)).to_string()
    raise TypeError(f"an LLM takes a str or a prompt value, not {type(value).__name__}: "
                    f"{_short(value)}")


def _fake_chunks(message: AIMessage) -> Iterator[AIMessageChunk]:
    """How `GenericFakeChatModel` splits a message: every whitespace character is its own chunk
    (so a double space gives an empty chunk); then one chunk per additional_kwargs entry.
    Lazily: a long answer costs nothing before its first chunk."""
    if message.content:
        text, start = message.text, 0
        for space in re.finditer(r"\s", text):
            yield AIMessageChunk(text[start:space.start()], id=message.id)
            yield AIMessageChunk(space.group(), id=message.id)
            start = space.end()
        yield AIMessageChunk(text[start:], id=message.id,
                             chunk_position=None if message.additional_kwargs else "last")
    for key, value in message.additional_kwargs.items():
        if key == "function_call" and isinstance(value, dict):
            for fkey, fvalue in value.items():
                for piece in re.split(r"(,)", fvalue) if isinstance(fvalue, str) else [fvalue]:
                    yield AIMessageChunk("", id=message.id,
                                         additional_kwargs={"function_call": {fkey: piece}})
        else:
            yield AIMessageChunk("", id=message.id, additional_kwargs={key: value})


class GenericFakeChatModel(BaseChatModel):
    """A fake chat model for docs and tests: each call answers with the next item of
    `messages` (a str or an AIMessage), streamed the way langchain_core's fake streams it.
    `sleep` waits that many seconds before each chunk, to show latency (an addition).

    >>> model = GenericFakeChatModel(messages=iter(["The sky  is\\nblue."]))
    >>> [c.content for c in model.stream("hi")]
    ['The', ' ', 'sky', ' ', '', ' ', 'is', '\\n', 'blue.']
    """

    def __init__(self, *, messages: Iterator[Union[str, AIMessage]], sleep: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages, self.sleep = messages, sleep

    def _next(self) -> Iterator[AIMessageChunk]:
        item = next(self.messages, None)
        if item is None:
            raise ValueError("GenericFakeChatModel has no messages left: give it an iterator "
                             "with one message per call, e.g. messages=iter(['a', 'b'])")
        return _fake_chunks(AIMessage(item) if isinstance(item, str) else item)

    def _stream(self, messages: List[BaseMessage], **kwargs: Any) -> Iterator[AIMessageChunk]:
        if not self.sleep:
            yield from self._next()
            return
        for chunk in self._next():
            time.sleep(self.sleep)
            yield chunk

    async def _astream(self, messages: List[BaseMessage], **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        for chunk in self._next():
            if self.sleep:
                await asyncio.sleep(self.sleep)
            yield chunk


class FakeListChatModelError(Exception):
    """Raised by `FakeListChatModel` at `error_on_chunk_number`.

    >>> model = FakeListChatModel(responses=["abc"], error_on_chunk_number=1)
    >>> [chunk.content for chunk in model.stream("x")]
    Traceback (most recent call last):
    ...
    minichain.FakeListChatModelError: FakeListChatModel raised at chunk 1 as configured
    """


def _one_at_a_time(config: Union[RunnableConfig, List[RunnableConfig], None]) -> Any:
    """A batch's config(s) with `max_concurrency=1`: inputs run one after another, in order."""
    if isinstance(config, list):
        return [{**c, "max_concurrency": 1} for c in config]
    return {**(config or {}), "max_concurrency": 1}


class FakeListChatModel(BaseChatModel):
    """A fake chat model that cycles through `responses`, one character per chunk.

    `sleep` waits before each chunk; `error_on_chunk_number=k` raises at chunk k (0-based).

    >>> model = FakeListChatModel(responses=["ab", "c"])
    >>> [c.content for c in model.stream("x")], model.invoke("x").content, model.invoke("x").content
    (['a', 'b'], 'c', 'ab')
    """

    def __init__(self, *, responses: List[str], sleep: Optional[float] = None,
                 error_on_chunk_number: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not responses:
            raise ValueError("FakeListChatModel needs at least one response")
        self.responses, self.sleep, self.error_on = list(responses), sleep, error_on_chunk_number
        self.turns = itertools.count()  # the answers given so far (next() is atomic: thread-safe)

    def _next(self) -> Iterator[AIMessageChunk]:
        text = self.responses[next(self.turns) % len(self.responses)]
        for i, ch in enumerate(text):  # lazily: one chunk per character
            yield AIMessageChunk(ch, chunk_position="last" if i == len(text) - 1 else None)

    def batch(self, inputs: List[Any], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> List[AIMessage]:
        """One input after another, so that answers follow the inputs (as langchain_core's).

        >>> [m.content for m in FakeListChatModel(responses=["a", "b"]).batch(["x", "y", "z"])]
        ['a', 'b', 'a']
        """
        return super().batch(inputs, _one_at_a_time(config), return_exceptions=return_exceptions,
                             **kwargs)

    async def abatch(self, inputs: List[Any], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> List[AIMessage]:
        """Async twin of `batch`: one input after another."""
        return await super().abatch(inputs, _one_at_a_time(config),
                                    return_exceptions=return_exceptions, **kwargs)

    def _check(self, i: int) -> None:
        if self.error_on is not None and i == self.error_on:
            raise FakeListChatModelError(f"FakeListChatModel raised at chunk {i} as configured")

    def _stream(self, messages: List[BaseMessage], **kwargs: Any) -> Iterator[AIMessageChunk]:
        for i, chunk in enumerate(self._next()):
            if self.sleep:
                time.sleep(self.sleep)
            self._check(i)
            yield chunk

    async def _astream(self, messages: List[BaseMessage], **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        for i, chunk in enumerate(self._next()):
            if self.sleep:
                await asyncio.sleep(self.sleep)
            self._check(i)
            yield chunk


# ==============================================================================================
# 8. Output parsers: str and incremental JSON
#
# A parser runs a push machine (`feed(text)` and `finish()` return what to yield), as the
# decoders of section 13 do, driven by the transform loops below. `JsonOutputParser` yields a
# new snapshot of the partial object each time it grows: the same snapshots as langchain_core's,
# at linear total cost (it never re-parses). The incremental JSON parser it runs on,
# `_JsonStream`, is appendix A at the end of the file.
# ==============================================================================================

class OutputParserException(ValueError):
    """The model's output could not be parsed; `llm_output` holds the text.

    >>> OutputParserException("Invalid json output: nope", llm_output="nope").llm_output
    'nope'
    """

    def __init__(self, message: str, llm_output: Optional[str] = None) -> None:
        super().__init__(message)
        self.llm_output = llm_output


def parse_partial_json(text: str) -> Any:
    """Parse the start of a JSON document as if it were closed where it stops.

    Dangling keys, partial literals and trailing commas are dropped; an open string is
    closed; text after the value is ignored, but a stray closer there gives None (as in
    langchain_core). Raises `json.JSONDecodeError` when nothing can be shown, or for bad JSON.

    >>> parse_partial_json('{"name": "Fra'), parse_partial_json('[1, {"a": tr')
    ({'name': 'Fra'}, [1, {}])
    """
    stream = _JsonStream(markdown=False)
    stream.read(text)
    stream.end()
    value = stream.snapshot()
    if stream.error or value is _MISSING:
        raise json.JSONDecodeError(stream.error or "no JSON value yet", text, min(stream.offset, len(text)))
    return None if stream.stray_closer else value


class BaseOutputParser(Runnable[Any, Output]):
    """A parser: model output (messages or text) in, parsed values out, chunk by chunk.

    A subclass gives a push machine for each run (`_start()`: an object whose `feed(text)`
    and `finish()` return the values to yield), or writes `_feed(state, text)` itself; and
    `parse(text)` for a whole output (what `invoke` returns). One that writes only `parse`
    parses the whole output and does not stream, as in langchain_core.

    >>> class Words(BaseOutputParser):
    ...     def _feed(self, state, text):
    ...         return [text.split()]
    ...     def parse(self, text):
    ...         return text.split()
    >>> list(Words().transform(iter(["a b", "c"]))), Words().invoke("a b")
    ([['a', 'b'], ['c']], ['a', 'b'])
    """

    run_type = "parser"

    _whole = False  # writes only `parse`: it folds its input first and has no stream events

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = BaseOutputParser  # it writes none of these: only `parse`
        cls._whole = (cls._start, cls._feed, cls._transform, cls._atransform) == (
            base._start, base._feed, base._transform, base._atransform)
        # a parser that folds shows its input at start (unless a class says otherwise itself)
        owner = next(c for c in cls.__mro__ if "input_in_start" in c.__dict__)
        if owner is not cls and (cls._whole or getattr(owner, "_whole", False)):
            cls.input_in_start = cls._whole

    def _streams(self, invoked: bool) -> bool:
        return not self._whole and super()._streams(invoked)

    def _start(self) -> Any:
        return None

    def _feed(self, state: Any, text: str) -> Iterable[Any]:
        out: Iterable[Any] = state.feed(text)  # (no `cast`: it is a call, and this runs per chunk)
        return out

    def _machine(self) -> Any:
        """A fresh state from `_start()`, checked once to be a push machine where `_feed`
        drives it."""
        state = self._start()
        if type(self)._feed is BaseOutputParser._feed and not callable(getattr(state, "feed", None)):
            raise TypeError(f"{type(self).__name__}._start() gave {_short(state)}, not a push "
                            "machine (an object with feed(text) and finish()); return one, or "
                            "write _feed(state, text)")
        return state

    def _finish(self, state: Any) -> Iterable[Any]:
        if type(self)._feed is not BaseOutputParser._feed:  # it feeds its state itself
            return ()
        out: Iterable[Any] = state.finish()
        return out

    def parse(self, text: str) -> Any:
        """Parse a whole output."""
        raise NotImplementedError

    # deviation: `stream(text)` streams the text as one chunk, as `transform` would
    # (langchain_core's parsers invoke there: one whole value, no stream events when nested)
    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        if self._whole:  # fold, then parse the whole text (`_produce`)
            yield from Runnable._transform(self, inputs, config)
            return
        state = self._machine()
        try:
            for chunk in inputs:
                yield from self._feed(state, _text_of(chunk))
        finally:
            _close(inputs)
        yield from self._finish(state)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        if self._whole:
            value = await _afold(inputs)
            if value is not _MISSING:
                yield self.parse(_text_of(value))
            return
        state = self._machine()
        try:
            async for chunk in inputs:
                for out in self._feed(state, _text_of(chunk)):
                    yield out
        finally:
            await _aclose(inputs)
        for out in self._finish(state):
            yield out

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        yield self.parse(_text_of(value))

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        return Runnable._transform(self, inputs, config)  # fold, then parse the whole text

    def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        return Runnable._atransform(self, inputs, config)


class StrOutputParser(BaseOutputParser[str]):
    """The text of each chunk: model output as a stream of strings.

    >>> chunks = GenericFakeChatModel(messages=iter(["a b"])).stream("x")
    >>> list(StrOutputParser().transform(chunks))
    ['a', ' ', 'b']
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.parse is not StrOutputParser.parse and "_transform" not in cls.__dict__:
            # its own `parse` sees each chunk's text, as in langchain_core: the general loops
            cls._transform, cls._atransform = BaseOutputParser._transform, BaseOutputParser._atransform  # type: ignore[method-assign]

    def _feed(self, state: Any, text: str) -> Iterable[str]:
        return (self.parse(text),)

    def parse(self, text: str) -> str:
        return text

    # The loops of BaseOutputParser, specialised: this parser sits on the per-token path.
    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        try:
            for chunk in inputs:
                content = chunk.content if chunk.__class__ is AIMessageChunk else None
                yield content if content.__class__ is str else _text_of(chunk)
        finally:
            _close(inputs)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        try:
            async for chunk in inputs:
                content = chunk.content if chunk.__class__ is AIMessageChunk else None
                yield content if content.__class__ is str else _text_of(chunk)
        finally:
            await _aclose(inputs)


class JsonOutputParser(BaseOutputParser[Any]):
    """Parses JSON from model output, streaming partial objects as the JSON grows.

    Streaming yields a new snapshot only when the value changed: keys appear once their value
    starts, strings grow by prefix, numbers digit by digit. Each snapshot is a fresh object,
    but only the containers still open (the path to what changed) are copied; finished
    sub-objects are shared between snapshots (treat them as read-only). The cost is linear in
    the text plus the size of those copies (langchain_core re-parses everything per chunk);
    whether the value changed is known without comparing snapshots. Any depth works (nothing
    recurses). Text that is not JSON streams nothing; `invoke` raises `OutputParserException`
    for it, and so does streaming an integer longer than Python converts (4,300 digits unless
    `sys.set_int_max_str_digits` changed it, on 3.11+). A number over 4,300 characters shows
    no new value until it ends.

    >>> chunks = ['{"name": "Fr', 'ance", "pop', '": 67', '4}']
    >>> list(JsonOutputParser().transform(iter(chunks)))
    [{'name': 'Fr'}, {'name': 'France'}, {'name': 'France', 'pop': 67}, {'name': 'France', 'pop': 674}]
    >>> JsonOutputParser().invoke('```json\\n{"a": [1, 2]}\\n```')
    {'a': [1, 2]}

    With `diff=True` it streams JSON-patch operations from one snapshot to the next instead
    (the same ops as langchain_core's); no snapshot is made or compared: the ops come from the
    levels of the open containers that changed. A growing string's op carries the whole
    string and every op its full path, as langchain_core's do; to keep the ops' total size
    linear in the text (at most 16 characters per character read, plus 64 Ki), a change that
    would pass that budget is held and sent with a later one, and the last at the end. Only a
    long string arriving in small pieces, or very deep nesting, ever reaches the budget.

    >>> list(JsonOutputParser(diff=True).transform(iter(['{"a": [1', ', 2], "b": "x', 'y"}'])))
    [[{'op': 'replace', 'path': '', 'value': {'a': [1]}}], [{'op': 'add', 'path': '/b', 'value': 'x'}, {'op': 'add', 'path': '/a/1', 'value': 2}], [{'op': 'replace', 'path': '/b', 'value': 'xy'}]]
    """

    def __init__(self, *, diff: bool = False) -> None:
        self.diff = diff
        # deviation: langchain_core `+`-adds the snapshots where a step folds them (for
        # `[10, 20, 30]`: [10] + [10, 20] + [10, 20, 30]), so stream and invoke differ there
        self._cumulative = not diff

    def _start(self) -> _JsonStream:
        return _JsonStream(diff=self.diff)

    def parse(self, text: str) -> Any:
        """Parse a whole output (a partial document gives its partial value)."""
        try:
            return parse_json_markdown(text)
        except json.JSONDecodeError as e:
            raise OutputParserException(
                f"Invalid json output: {e.doc}\n({e.msg} at line {e.lineno} column {e.colno}; "
                "expected one JSON value, optionally inside a ```json fence)", llm_output=e.doc) from None

    def get_format_instructions(self) -> str:
        """What to tell the model, as langchain_core's (without a schema).

        >>> JsonOutputParser().get_format_instructions()
        'Return a JSON object.'
        """
        return "Return a JSON object."


def parse_json_markdown(text: str) -> Any:
    """The JSON value in a model's answer: bare, or in a ```json fence after some prose; a
    partial document gives its partial value (what `JsonOutputParser.parse` returns).
    Raises `json.JSONDecodeError` where there is no JSON value.

    >>> parse_json_markdown('Here it is:\\n```json\\n{"a": [1, 2]}\\n```')
    {'a': [1, 2]}
    >>> parse_json_markdown('{"a": "b", "c": [1')
    {'a': 'b', 'c': [1]}
    """
    state = _JsonStream()
    text = text.strip()
    state.read(text)
    state.end()
    value = state.snapshot()
    if state.error or value is _MISSING:
        raise json.JSONDecodeError(state.error or "no JSON value found", text, min(state.offset, len(text)))
    return value


# ==============================================================================================
# 9. Past the guide: fallbacks, retry, branch, pick, list parsers, fakes that list
#
# What LCEL code reaches for after the guide, built on the protocol above and on nothing else:
# a runnable that falls back or retries, one that picks a branch or some keys, parsers that
# stream the items of a list, and fake LLMs that answer from a list. The core does not use them.
# ==============================================================================================

class RunnablePick(Runnable[Dict[str, Any], Any]):
    """Picks keys from a dict, chunk by chunk: one key gives its value, a list of keys a dict
    of those present (a chunk with none of them is skipped). What `.pick(keys)` adds.

    >>> RunnablePick("a").invoke({"a": 1, "b": 2}), RunnablePick(["a", "c"]).invoke({"a": 1, "b": 2})
    (1, {'a': 1})
    """

    def __init__(self, keys: Union[str, List[str]]) -> None:
        self.keys = keys

    def _name(self) -> str:
        keys = [self.keys] if isinstance(self.keys, str) else self.keys
        return self.name or f"RunnablePick<{','.join(keys)}>"

    def _pick(self, chunk: Any) -> Any:
        if not isinstance(chunk, dict):
            raise TypeError(f"{self.get_name()} needs dict input, got {type(chunk).__name__}: "
                            f"{_short(chunk)}")
        if isinstance(self.keys, str):
            return chunk.get(self.keys)
        return AddableDict({k: chunk[k] for k in self.keys if k in chunk}) or None

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        for chunk in inputs:
            picked = self._pick(chunk)
            if picked is not None:
                yield picked

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        try:
            async for chunk in inputs:
                picked = self._pick(chunk)
                if picked is not None:
                    yield picked
        finally:
            await _aclose(inputs)


class RunnableWithFallbacks(Runnable[Input, Output]):
    """A runnable that, when it fails with one of `exceptions_to_handle`, tries each of
    `fallbacks` in turn on the same input; if all fail, the first error is raised. What
    `with_fallbacks` makes. Streaming falls back only while nothing was yielded: once a
    chunk is out, an error goes to the caller (as in langchain_core). With `exception_key`,
    a fallback gets the input dict with the last error under that key.

    >>> def broken(x):
    ...     raise ValueError("down")
    >>> RunnableLambda(broken).with_fallbacks([RunnableLambda(lambda x: f"backup: {x}")]).invoke(1)
    'backup: 1'
    """

    input_in_start = True
    _passes_through = True  # what it runs reports the stream

    def __init__(self: "RunnableWithFallbacks[Any, Any]", runnable: Any, fallbacks: Sequence[Any], *,
                 exceptions_to_handle: Tuple[Type[BaseException], ...] = (Exception,),
                 exception_key: Optional[str] = None) -> None:
        self.runnable = coerce_to_runnable(runnable)
        self.fallbacks = [coerce_to_runnable(f) for f in fallbacks]
        self.exceptions_to_handle, self.exception_key = tuple(exceptions_to_handle), exception_key

    @property
    def runnables(self) -> List[Runnable[Any, Any]]:
        """The runnable, then its fallbacks: the order they are tried in."""
        return [self.runnable, *self.fallbacks]

    def _input(self, value: Any, error: Optional[BaseException]) -> Any:
        if self.exception_key is None or error is None:
            return value
        if not isinstance(value, dict):
            raise TypeError(f"with_fallbacks(exception_key={self.exception_key!r}) needs a dict "
                            f"input to add the error to, got {type(value).__name__}: {_short(value)}")
        return {**value, self.exception_key: error}

    def _tries(self, value: Any, errors: List[BaseException]) -> Iterator[Tuple[Runnable[Any, Any], Any]]:
        """Each runnable in turn with its input (with `exception_key`, the last of `errors`
        added); when all have failed, the first error is raised."""
        for runnable in self.runnables:
            yield runnable, self._input(value, errors[-1] if errors else None)
        raise errors[0]

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        errors: List[BaseException] = []
        for runnable, arg in self._tries(_fold(inputs), errors):
            chunks = runnable._stream_run(iter([arg]), config, None, arg)
            try:
                head = next(chunks, _MISSING)
            except self.exceptions_to_handle as exc:
                _close(chunks)
                errors.append(exc)
                continue
            try:
                if head is not _MISSING:
                    yield head
                    yield from chunks
            finally:
                _close(chunks)
            return

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        errors: List[BaseException] = []
        for runnable, arg in self._tries(await _afold(inputs), errors):
            chunks = runnable._astream_run(_aiter([arg]), config, None, arg)
            try:
                head = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except self.exceptions_to_handle as exc:
                await _aclose(chunks)
                errors.append(exc)
                continue
            try:
                yield head
                async for chunk in chunks:
                    yield chunk
            finally:
                await _aclose(chunks)
            return

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        errors: List[BaseException] = []
        for runnable, arg in self._tries(_fold(inputs), errors):  # a failure at any point
            try:
                out = runnable._invoke(arg, config)
            except self.exceptions_to_handle as exc:
                errors.append(exc)
                continue
            yield out
            return

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        errors: List[BaseException] = []
        for runnable, arg in self._tries(await _afold(inputs), errors):
            try:
                out = await runnable._ainvoke(arg, config)
            except self.exceptions_to_handle as exc:
                errors.append(exc)
                continue
            yield out
            return

    def __repr__(self) -> str:
        return f"{self.runnable!r}.with_fallbacks({self.fallbacks!r})"


class RunnableRetry(RunnableBinding[Input, Output]):
    """A runnable retried when it fails with one of `retry_exception_types`, at most
    `max_attempt_number` attempts, waiting exponentially longer (with jitter) between them.
    What `with_retry` makes. As in langchain_core, `invoke`/`batch` (and their async twins)
    retry, each attempt a child run tagged `retry:attempt:N` from the second on; `stream`
    and the event APIs run the runnable once, without retrying: a retry could not take back
    chunks already yielded.

    >>> calls = []
    >>> def flaky(x):
    ...     calls.append(x)
    ...     if len(calls) < 3:
    ...         raise ValueError("try again")
    ...     return f"ok after {len(calls)}"
    >>> RunnableLambda(flaky).with_retry(wait_exponential_jitter=False).invoke(1)
    'ok after 3'
    """

    def __init__(self, bound: Runnable[Input, Output], *,
                 retry_exception_types: Tuple[Type[BaseException], ...] = (Exception,), max_attempt_number: int = 3,
                 wait_exponential_jitter: bool = True,
                 exponential_jitter_params: Optional[Dict[str, float]] = None) -> None:
        super().__init__(bound, {})
        if not isinstance(max_attempt_number, int) or max_attempt_number < 1:
            raise ValueError(f"with_retry: stop_after_attempt must be an int >= 1, not "
                             f"{_short(max_attempt_number)}")
        self.retry_exception_types = tuple(retry_exception_types)
        self.max_attempt_number, self.wait_exponential_jitter = max_attempt_number, wait_exponential_jitter
        self.exponential_jitter_params = exponential_jitter_params

    def _wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt`: tenacity's exponential jitter
        (`initial * exp_base ** (attempt - 1)` plus up to `jitter`, at most `max`)."""
        if not self.wait_exponential_jitter:
            return 0.0
        import random
        p = {"initial": 1.0, "max": 60.0, "exp_base": 2.0, "jitter": 1.0,
             **(self.exponential_jitter_params or {})}
        return min(p["initial"] * p["exp_base"] ** (attempt - 1) + random.uniform(0, p["jitter"]), p["max"])

    def _attempts(self, config: RunnableConfig) -> Iterator[Tuple[int, RunnableConfig]]:
        kwargs = {**self.kwargs, **_call_kwargs(self, config)}
        if kwargs:  # the bound runnable is called with them
            config = {**config, "_kwargs": (self.bound, kwargs)}
        for n in range(1, self.max_attempt_number + 1):
            yield n, config if n == 1 else _merge_configs(config, {"tags": [f"retry:attempt:{n}"]})

    def _stream_run(self, inputs: Iterator[Any], config: RunnableConfig, tag: Optional[str] = None,
                    known: Any = _MISSING, invoked: bool = False) -> Iterator[Any]:
        if not invoked:  # streaming runs once (langchain_core's retry wraps invoke only)
            return super()._stream_run(inputs, config, tag, known, invoked)
        return Runnable._stream_run(self, inputs, self._bind(config), tag, known, invoked)

    def _astream_run(self, inputs: AsyncIterator[Any], config: RunnableConfig,
                     tag: Optional[str] = None, known: Any = _MISSING,
                     invoked: bool = False) -> AsyncIterator[Any]:
        if not invoked:
            return super()._astream_run(inputs, config, tag, known, invoked)
        return Runnable._astream_run(self, inputs, self._bind(config), tag, known, invoked)

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        value = _fold(inputs)
        for n, attempt in self._attempts(config):
            try:
                out = self.bound._invoke(value, attempt)
            except self.retry_exception_types:
                if n == self.max_attempt_number:
                    raise
                time.sleep(self._wait(n))
                continue
            yield out
            return

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        value = await _afold(inputs)
        for n, attempt in self._attempts(config):
            try:
                out = await self.bound._ainvoke(value, attempt)
            except self.retry_exception_types:
                if n == self.max_attempt_number:
                    raise
                await asyncio.sleep(self._wait(n))
                continue
            yield out
            return

    def __repr__(self) -> str:
        return f"{self.bound!r}.with_retry(stop_after_attempt={self.max_attempt_number})"


class RunnableBranch(Runnable[Input, Output]):
    """Runs the first branch whose condition holds for the input, else the default:
    `RunnableBranch((condition, runnable), ..., default)`. Conditions and branches may be
    runnables, functions or dicts; the conditions run one by one (tagged `condition:N`)
    until one is true, then the chosen branch streams (tagged `branch:N` or `branch:default`).

    >>> sign = RunnableBranch((lambda x: x > 0, lambda x: "positive"), (lambda x: x < 0, lambda x: "negative"), lambda x: "zero")
    >>> sign.invoke(5), sign.invoke(-1), list(sign.stream(0))
    ('positive', 'negative', ['zero'])
    """

    input_in_start = True
    _passes_through = True  # what it runs reports the stream

    def __init__(self: "RunnableBranch[Any, Any]", *branches: Any) -> None:
        if len(branches) < 2:
            raise ValueError(f"RunnableBranch needs at least one (condition, runnable) pair and "
                             f"a default, got {len(branches)} argument{'s' * (len(branches) != 1)}: "
                             "RunnableBranch((lambda x: ..., runnable), default)")
        self.branches: List[Tuple[Runnable[Any, Any], Runnable[Any, Any]]] = []
        for i, pair in enumerate(branches[:-1], 1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                got = f"a {type(pair).__name__} of {len(pair)}" if isinstance(pair, (tuple, list)) \
                    else _short(pair)
                raise TypeError(f"RunnableBranch branch {i} must be a (condition, runnable) pair, "
                                f"not {got}")
            self.branches.append((coerce_to_runnable(pair[0]), coerce_to_runnable(pair[1])))
        if isinstance(branches[-1], (tuple, list)):
            raise TypeError("RunnableBranch's last argument is the default: a runnable, function "
                            f"or dict, not the pair {_short(branches[-1])}")
        self.default = coerce_to_runnable(branches[-1])

    def _branch(self, value: Any, config: RunnableConfig) -> Tuple[Runnable[Any, Any], str]:
        for i, (condition, runnable) in enumerate(self.branches, 1):
            if condition._invoke(value, config, f"condition:{i}"):
                return runnable, f"branch:{i}"
        return self.default, "branch:default"

    async def _abranch(self, value: Any, config: RunnableConfig) -> Tuple[Runnable[Any, Any], str]:
        for i, (condition, runnable) in enumerate(self.branches, 1):
            if await condition._ainvoke(value, config, f"condition:{i}"):
                return runnable, f"branch:{i}"
        return self.default, "branch:default"

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        value = _fold(inputs)
        runnable, tag = self._branch(value, config)
        yield from runnable._stream_run(iter([value]), config, tag, value)

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        value = await _afold(inputs)
        runnable, tag = await self._abranch(value, config)
        chunks = runnable._astream_run(_aiter([value]), config, tag, value)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await _aclose(chunks)

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        value = _fold(inputs)
        runnable, tag = self._branch(value, config)
        yield runnable._invoke(value, config, tag)

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        value = await _afold(inputs)
        runnable, tag = await self._abranch(value, config)
        yield await runnable._ainvoke(value, config, tag)


class _CsvItems:
    """Comma-separated items as a push machine: `feed(text)` returns the items completed,
    `finish()` the rest. It reads as Python's `csv` module does with `skipinitialspace=True`
    (quotes group, `""` is a quote, newlines end a row, blank rows are skipped), scanning each
    character once. An item is out once the next one has begun, as in langchain_core."""

    # where it is: at a row's start, a field's start, in a field, in quotes, just after a
    # quote in quotes (a second one is a quote; anything else ends the quotes)
    ROW, FIELD, TEXT, QUOTED, QUOTE = range(5)
    _special = re.compile(r"[,\r\n]")

    def __init__(self) -> None:
        self.state = self.ROW
        self.pieces: List[str] = []  # the field being read
        self.done: List[str] = []  # fields read and not yet out

    def _save(self, state: int) -> None:
        self.done.append("".join(self.pieces))
        self.pieces, self.state = [], state

    def feed(self, text: str) -> List[str]:
        i, n = 0, len(text)
        while i < n:
            state = self.state
            if state == self.QUOTED:
                j = text.find('"', i)
                self.pieces.append(text[i:] if j < 0 else text[i:j])
                if j < 0:
                    break
                self.state, i = self.QUOTE, j + 1
                continue
            if state == self.TEXT:
                m = self._special.search(text, i)
                self.pieces.append(text[i:m.start() if m else n])
                if m is None:
                    break
                i = m.end()
                self._save(self.FIELD if m.group() == "," else self.ROW)
                continue
            c = text[i]
            i += 1
            if state == self.ROW:
                if c not in "\r\n":  # deviation: a lone \r ends a row (csv raises there)
                    self.state, i = self.FIELD, i - 1
            elif c == ",":
                self._save(self.FIELD)
            elif c in "\r\n":
                self._save(self.ROW)
            elif state == self.FIELD and c == '"':
                self.state = self.QUOTED
            elif state == self.QUOTE and c == '"':
                self.pieces.append(c)
                self.state = self.QUOTED
            elif not (state == self.FIELD and c == " "):
                self.state, i = self.TEXT, i - 1
        # the last item saved waits while a new row has not begun
        out, self.done = (self.done[:-1], self.done[-1:]) if self.state == self.ROW else (self.done, [])
        return out

    def finish(self) -> List[str]:
        if self.state != self.ROW:
            self._save(self.ROW)
        return self.done


class _LineItems:
    """Items that are one line each (a numbered or a markdown list) as a push machine, matching
    what `re.findall(pattern, text)` finds. A line is matched once, when its newline arrives;
    a marker that ends a line (`"1."`, `"-"`) takes the next line as its item. An item is out
    once the next one has begun (as in langchain_core): the unfinished line is checked through
    a few characters only, so the cost stays linear however long a line grows."""

    def __init__(self, item: str, marker_at_end: str, begun: str, anchored: bool) -> None:
        self.item, self.marker_at_end = re.compile(item), re.compile(marker_at_end)
        self.begun, self.anchored = re.compile(begun), anchored
        self.tail: List[str] = []  # the unfinished line, in pieces
        self.head = ""  # anchored: its first characters after indentation; else its last three
        self.held: Optional[str] = None  # the last item found, out when the next one begins
        self.carry = False  # the line before ended with a marker: this line is an item

    def _line(self, line: str) -> Optional[str]:
        if self.carry and line:
            self.carry = False
            return line
        m = self.item.match(line) if self.anchored else self.item.search(line)
        self.carry = m is None and self.marker_at_end.search(line) is not None
        return m.group(1) if m else None

    def feed(self, text: str) -> List[str]:
        out = []
        *lines, piece = text.split("\n")
        if lines:
            lines[0] = "".join(self.tail) + lines[0]
            self.tail, self.head = [], ""
        for line in lines:
            found = self._line(line)
            if found is not None:
                if self.held is not None:
                    out.append(self.held)
                self.held = found
        self.tail.append(piece)
        if self.anchored:  # does the line begin with a marker, a space and a character?
            self.head = (self.head + piece if self.head else piece.lstrip())[:3]
            begun = self.begun.match(self.head)
        else:  # is there a number, a dot, a space and a character anywhere in it?
            begun = self.begun.search(self.head + piece)
            self.head = (self.head + piece[-3:])[-3:]
        if self.held is not None and (begun or (self.carry and piece)):
            out.append(self.held)
            self.held = None
        return out

    def finish(self) -> List[str]:
        found = self._line("".join(self.tail))
        return [item for item in (self.held, found) if item is not None]


if TYPE_CHECKING:
    _ListParserBase = BaseOutputParser[List[str]]
else:
    _ListParserBase = object


class _ListParser(_ListParserBase):
    """What the list parsers share (a mixin, so that each parser stays a direct subclass of
    `BaseOutputParser`): a push machine of items and langchain_core's instructions.
    Streaming yields each item as a one-item list once the next one has begun (as
    langchain_core's); `invoke` gives the whole list; any split of the text gives the same
    items, at a cost linear in the text."""

    _instructions = ""

    def _feed(self, state: Any, text: str) -> Iterable[List[str]]:
        return [[item] for item in state.feed(text)]

    def _finish(self, state: Any) -> Iterable[List[str]]:
        return [[item] for item in state.finish()]

    def parse(self, text: str) -> List[str]:
        """The items of a whole text."""
        state = self._start()
        return cast(List[str], state.feed(text) + state.finish())

    def get_format_instructions(self) -> str:
        """What to tell the model about the format (langchain_core's words)."""
        return self._instructions


class CommaSeparatedListOutputParser(_ListParser, BaseOutputParser[List[str]]):
    """Comma-separated items, read as CSV: a space after a comma is skipped, quotes group,
    newlines separate too.

    >>> parser = CommaSeparatedListOutputParser()
    >>> list(parser.transform(iter(["red, gre", "en, ", '"blue, dark"'])))
    [['red'], ['green'], ['blue, dark']]
    >>> parser.invoke("red, green")
    ['red', 'green']
    """

    # deviation: items never depend on how the text was split, and stream and invoke agree
    # (langchain_core re-reads only the unfinished item's value: a quote, a newline or an empty
    # item after a final comma at the end of a chunk can be lost)
    _instructions = ("Your response should be a list of comma separated values, "
                     "eg: `foo, bar, baz` or `foo,bar,baz`")

    def _start(self) -> _CsvItems:
        return _CsvItems()


class NumberedListOutputParser(_ListParser, BaseOutputParser[List[str]]):
    """The items of a numbered list: what follows each `1. ` to the end of its line.

    >>> list(NumberedListOutputParser().transform(iter(["1. red\\n2. gr", "een\\n3. blue"])))
    [['red'], ['green'], ['blue']]
    """

    _instructions = ("Your response should be a numbered list with each item on a new line. "
                     "For example: \n\n1. foo\n\n2. bar\n\n3. baz")

    def _start(self) -> _LineItems:
        return _LineItems(r"\d+\.\s([^\n]+)", r"\d+\.$", r"\d\.\s.", anchored=False)


class MarkdownListOutputParser(_ListParser, BaseOutputParser[List[str]]):
    """The items of a markdown list: lines starting with `- ` or `* `.

    >>> MarkdownListOutputParser().invoke("Colours:\\n- red\\n  * green")
    ['red', 'green']
    """

    _instructions = "Your response should be a markdown list, eg: `- foo\n- bar\n- baz`"

    def _start(self) -> _LineItems:
        return _LineItems(r"\s*[-*]\s([^\n]+)$", r"^\s*[-*]$", r"[-*]\s.", anchored=True)


class FakeListLLM(BaseLLM):
    """A fake LLM that cycles through `responses`; it does not stream (one chunk per call).

    >>> llm = FakeListLLM(responses=["hello world"])
    >>> list(llm.stream("hi")), llm.invoke("hi")
    (['hello world'], 'hello world')
    """

    def __init__(self, *, responses: List[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.responses, self.turns = list(responses), itertools.count()

    def _call(self, prompt: str, **kwargs: Any) -> str:
        return self.responses[next(self.turns) % len(self.responses)]


class FakeListLLMError(Exception):
    """Raised by `FakeStreamingListLLM` at `error_on_chunk_number`.

    >>> list(FakeStreamingListLLM(responses=["abc"], error_on_chunk_number=1).stream("x"))
    Traceback (most recent call last):
    ...
    minichain.FakeListLLMError: FakeStreamingListLLM raised at chunk 1 as configured
    """


# deviation: not a subclass of FakeListLLM (langchain_core's is), to keep classes at most three
# levels below object; it shares FakeListLLM's code instead.
class FakeStreamingListLLM(BaseLLM):
    """A `FakeListLLM` whose `stream` gives the answer one character per chunk.

    As langchain_core's, it streams by invoking: its run ends with the whole answer (no
    `on_llm_stream` events), then the characters move on, after `sleep` seconds each;
    `error_on_chunk_number=k` raises `FakeListLLMError` at character k (0-based) of a stream,
    never in `invoke`.

    >>> llm = FakeStreamingListLLM(responses=["hi", "yo"])
    >>> list(llm.stream("x")), llm.invoke("x")
    (['h', 'i'], 'yo')
    """

    def __init__(self, *, responses: List[str], sleep: Optional[float] = None,
                 error_on_chunk_number: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.responses, self.turns = list(responses), itertools.count()
        self.sleep, self.error_on = sleep, error_on_chunk_number

    _call = FakeListLLM._call

    def _check(self, i: int) -> None:
        # deviation: the error reaches astream_events' caller too (langchain_core's root
        # astream_events ends quietly after on_llm_end)
        if i == self.error_on:
            raise FakeListLLMError(f"FakeStreamingListLLM raised at chunk {i} as configured")

    def _stream_run(self, inputs: Iterator[Any], config: RunnableConfig, tag: Optional[str] = None,
                    known: Any = _MISSING, invoked: bool = False) -> Iterator[Any]:
        answers = super()._stream_run(inputs, config, tag, known, invoked)
        return answers if invoked else self._characters(answers)

    def _characters(self, answers: Iterator[str]) -> Iterator[str]:
        try:
            for answer in answers:
                for i, c in enumerate(answer):
                    if self.sleep is not None:
                        time.sleep(self.sleep)
                    self._check(i)
                    yield c
        finally:
            _close(answers)

    def _astream_run(self, inputs: AsyncIterator[Any], config: RunnableConfig,
                     tag: Optional[str] = None, known: Any = _MISSING,
                     invoked: bool = False) -> AsyncIterator[Any]:
        answers = super()._astream_run(inputs, config, tag, known, invoked)
        return answers if invoked else self._acharacters(answers)

    async def _acharacters(self, answers: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for answer in answers:
                for i, c in enumerate(answer):
                    if self.sleep is not None:
                        await asyncio.sleep(self.sleep)
                    self._check(i)
                    yield c
        finally:
            await _aclose(answers)


# ==============================================================================================
# 10. LangChain-style callback handlers and run listeners
#
# Adapters over the events of section 2: a handler's methods (`on_chat_model_start`,
# `on_llm_new_token`, ...) are called with langchain_core's arguments, and `with_listeners`
# builds `RunTree` records. Nothing here runs unless such a handler is passed.
# ==============================================================================================

class BaseCallbackHandler:
    """A LangChain-style callback handler: override the methods you need, pass it in
    `callbacks=[...]` like any listener. Each event of a run becomes a call with
    langchain_core's arguments (the `ignore_*` flags skip a family):
    `on_chain_start(serialized, inputs, *, run_id, parent_run_id, tags, metadata, name)`
    (`inputs` is `{"input": ""}` when the run started streaming before its input was known;
    prompts and parsers also get `run_type`), `on_chain_end(outputs, ...)`,
    `on_chat_model_start(serialized, messages, ...)`, `on_llm_start(serialized, prompts, ...)`,
    `on_llm_new_token(token, *, chunk, ...)`, `on_llm_end(response, ...)` (an `LLMResult`),
    `on_tool_start(serialized, input_str, *, inputs, ...)`, `on_tool_end(output, ...)`,
    `on_retriever_start(serialized, query, ...)`, `on_retriever_end(documents, ...)`,
    `on_custom_event(name, data, *, run_id, tags, metadata)`, and `on_*_error(error, ...)`
    for each family. Run ids are `uuid.UUID`s.

    >>> class Tokens(BaseCallbackHandler):
    ...     def on_llm_new_token(self, token, **kwargs):
    ...         print(repr(token), end=" ")
    >>> _ = list(GenericFakeChatModel(messages=iter(["hi there"])).stream("x", {"callbacks": [Tokens()]}))
    'hi' ' ' 'there' 
    """

    raise_error = False  # raise a method's error instead of logging it
    errors = True  # it is told of failed runs (`on_*_error`)
    run_inline = False
    ignore_chain = ignore_llm = ignore_chat_model = ignore_retriever = ignore_agent = False
    ignore_retry = ignore_custom_event = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):  # every callback method does nothing unless overridden
            return _ignore
        raise AttributeError(name)

    def _as_listener(self) -> Callable[[Event], Any]:
        return _callback_calls(self)


class AsyncCallbackHandler(BaseCallbackHandler):
    """A callback handler whose methods are `async def`: the async APIs await each call in
    the order of the events (sync `invoke`/`stream` refuse it: use the async APIs).

    >>> class Ends(AsyncCallbackHandler):
    ...     async def on_chain_end(self, outputs, **kwargs):
    ...         print("end:", outputs)
    >>> asyncio.run(RunnableLambda(lambda x: x + 1).ainvoke(1, {"callbacks": [Ends()]}))
    end: 2
    2
    """


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _uuid(run_id: str) -> Any:
    import uuid
    return uuid.UUID(run_id)


def _callback_calls(h: BaseCallbackHandler) -> Callable[[Event], Any]:
    """The listener that turns events into a handler's method calls (langchain_core's)."""
    deferred = set()  # runs that started before their input was known: it comes at the end

    def call(event: Event) -> Any:
        kind, data = event["event"], event["data"]
        family, phase = kind[3:kind.rindex("_")], kind[kind.rindex("_") + 1:]
        if phase == "stream" and family not in ("chat_model", "llm"):
            return None  # a chain's chunks: no handler method (the common case: returned first)
        ids = {"run_id": _uuid(event["run_id"]), "tags": event["tags"],
               "parent_run_id": _uuid(event["parent_ids"][-1]) if event["parent_ids"] else None}
        if kind == "on_custom_event":
            return None if h.ignore_custom_event else h.on_custom_event(
                event["name"], data, run_id=ids["run_id"], tags=event["tags"],
                metadata=event["metadata"])
        run_type = {"run_type": family} if family in ("prompt", "parser") else {}
        if run_type:
            family = "chain"
        if phase == "error":
            method = {"chat_model": "llm"}.get(family, family)
            if getattr(h, f"ignore_{method}", False):
                return None
            return getattr(h, f"on_{method}_error")(data["error"], **ids)
        if phase == "start":
            # deviation: `serialized` is None or {"name": ...}, and models and tools get
            # their `name` too (langchain_core serializes prompts, models and tools)
            start = {**ids, "metadata": event["metadata"], "name": event["name"]}
            value = data.get("input", _MISSING)
            if family == "chain":
                # deviation: a streamed root shows its input at its start ({"input": ""} in
                # langchain_core); a step started before its input was known gets it at its end
                if value is _MISSING:
                    deferred.add(event["run_id"])
                return None if h.ignore_chain else h.on_chain_start(
                    None, {"input": ""} if value is _MISSING else value, **start, **run_type)
            if family == "chat_model":
                messages = value["messages"] if isinstance(value, dict) and "messages" in value \
                    else [_to_messages(value)]
                return None if h.ignore_chat_model else h.on_chat_model_start(
                    {"name": event["name"]}, messages, **start)
            if family == "llm":
                prompts = value["prompts"] if isinstance(value, dict) and "prompts" in value \
                    else [_to_prompt(value)]
                return None if h.ignore_llm else h.on_llm_start({"name": event["name"]}, prompts, **start)
            if family == "tool":
                return h.on_tool_start({"name": event["name"]}, str(value),
                                       inputs=value if isinstance(value, dict) else None, **start)
            if family == "retriever":
                return None if h.ignore_retriever else h.on_retriever_start(None, value, **start)
            return None
        if phase == "stream":
            # deviation: an invoked chat model streams too, so its tokens reach the handler
            # (langchain_core calls on_llm_new_token only when the model was streamed)
            if h.ignore_llm:
                return None
            chunk = data["chunk"]
            wrapped = ChatGenerationChunk(message=chunk) if family == "chat_model" \
                else GenerationChunk(text=chunk)
            return h.on_llm_new_token(token=wrapped.text, chunk=wrapped, **ids)
        output = data.get("output")
        if family == "chain":
            extra = {"inputs": data.get("input")} if event["run_id"] in deferred else {}
            deferred.discard(event["run_id"])
            return None if h.ignore_chain else h.on_chain_end(output, **ids, **extra)
        if family in ("chat_model", "llm"):
            if h.ignore_llm:
                return None
            if family == "chat_model":
                gen: Generation = ChatGenerationChunk(message=output) \
                    if isinstance(output, AIMessageChunk) else ChatGeneration(message=output)
            else:
                gen = Generation(text=output["generations"][0][0]["text"])
            return h.on_llm_end(LLMResult(generations=[[gen]]), **ids)
        if family == "tool":
            return h.on_tool_end(output, name=event["name"], **ids)
        if family == "retriever":
            return None if h.ignore_retriever else h.on_retriever_end(output, **ids)
        return None
    return call


class Generation:
    """One generated text, as `on_llm_end` shows it in `LLMResult.generations`.

    >>> Generation(text="hi").text
    'hi'
    """

    def __init__(self, text: str = "", generation_info: Optional[Dict[str, Any]] = None) -> None:
        self.text, self.generation_info = text, generation_info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(text={self.text!r})"


class GenerationChunk(Generation):
    """A piece of an LLM's text, as `on_llm_new_token(token, chunk=...)` gets it.

    >>> GenerationChunk(text="h").text
    'h'
    """


class ChatGeneration(Generation):
    """A chat model's message, as `LLMResult.generations` holds it (`text` is its text).

    >>> ChatGeneration(message=AIMessage("hi")).text
    'hi'
    """

    def __init__(self, *, message: Any) -> None:
        super().__init__(message.text if isinstance(message, BaseMessage) else str(message))
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(text={self.text!r}, message={self.message!r})"


class ChatGenerationChunk(ChatGeneration):
    """A chat model's chunk, as `on_llm_new_token(token, chunk=...)` gets it.

    >>> ChatGenerationChunk(message=AIMessageChunk("h")).message.content
    'h'
    """


class LLMResult:
    """What `on_llm_end` receives: `generations[0][0]` is the (chat) generation.

    >>> LLMResult(generations=[[Generation(text="hi")]]).generations[0][0].text
    'hi'
    """

    def __init__(self, generations: List[List[Generation]], llm_output: Optional[Dict[str, Any]] = None) -> None:
        self.generations, self.llm_output = generations, llm_output

    def __repr__(self) -> str:
        return f"LLMResult(generations={self.generations!r}, llm_output={self.llm_output!r})"


class StdOutCallbackHandler(BaseCallbackHandler):
    """Prints when each chain (step) starts and finishes, as langchain_core's does.

    >>> _ = RunnableLambda(lambda x: x).with_config(run_name="step").invoke(1, {"callbacks": [StdOutCallbackHandler()]})
    <BLANKLINE>
    <BLANKLINE>
    [1m> Entering new step chain...[0m
    <BLANKLINE>
    [1m> Finished chain.[0m
    """

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        print(f"\n\n\033[1m> Entering new {kwargs.get('name')} chain...\033[0m")

    def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
        print("\n\033[1m> Finished chain.\033[0m")


class StreamingStdOutCallbackHandler(BaseCallbackHandler):
    """Writes each token a model streams to stdout as it arrives.

    >>> _ = list(GenericFakeChatModel(messages=iter(["hi there"])).stream("x", {"callbacks": [StreamingStdOutCallbackHandler()]}))
    hi there
    """

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        import sys
        sys.stdout.write(token)
        sys.stdout.flush()


class RunTree:
    """A run as `with_listeners` functions see it (langsmith's RunTree, in part): `id`,
    `name`, `run_type`, `inputs` and `outputs` (dicts: a value that is not a dict sits under
    "input" / "output"), `error` (the exception's repr), `tags`, `metadata`,
    `parent_run_id`, `start_time`/`end_time` (UTC) and the `child_runs` inside it.

    >>> runs = []
    >>> _ = (RunnableLambda(lambda x: x) | RunnableLambda(str)).with_listeners(on_end=runs.append).invoke(1)
    >>> runs[0].name, runs[0].outputs, [child.name for child in runs[0].child_runs]
    ('RunnableSequence', {'output': '1'}, ['RunnableLambda', 'str'])
    """

    def __init__(self, event: Event) -> None:
        import datetime
        self.id, self.name = _uuid(event["run_id"]), event["name"]
        self.run_type = event["event"][3:-6]
        self.tags, self.metadata = event["tags"], event["metadata"]
        self.parent_run_id = _uuid(event["parent_ids"][-1]) if event["parent_ids"] else None
        # deviation: the real input at start (langchain_core: {"input": ""} when streamed)
        self.inputs = _as_dict(event["data"].get("input", ""), "input")
        self.outputs: Dict[str, Any] = {}
        self.error: Optional[str] = None
        self.start_time = datetime.datetime.now(datetime.timezone.utc)
        self.end_time: Any = None
        self.child_runs: List[RunTree] = []

    def finish(self, event: Event) -> None:
        import datetime
        self.end_time = datetime.datetime.now(datetime.timezone.utc)
        data = event["data"]
        if "error" in data:
            self.error = repr(data["error"])
        else:
            self.outputs = _as_dict(data.get("output"), "output")
        if "input" in data:
            self.inputs = _as_dict(data["input"], "input")

    def __repr__(self) -> str:
        return f"RunTree(name={self.name!r}, run_type={self.run_type!r}, id={str(self.id)!r})"


def _as_dict(value: Any, key: str) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {key: value}


class _RunTracker:
    """The listener behind `with_listeners`: it builds a `RunTree` of each run it is given
    (and its children), and calls the functions at the root run's start, end or error."""

    errors = True  # it is told of failures too (`Run.fail`)

    def __init__(self, *listeners: Optional[Callable[..., Any]]) -> None:
        self.listeners = [(f, _takes_two(f)) if f else None for f in listeners]
        self.runs: Dict[str, RunTree] = {}

    def _call(self, which: int, run: RunTree) -> None:
        entry = self.listeners[which]
        if entry is not None:
            func, two = entry
            func(run, {"tags": run.tags, "metadata": run.metadata}) if two else func(run)

    def __call__(self, event: Event) -> None:
        kind, run_id = event["event"], event["run_id"]
        if kind.endswith("_start"):
            run = self.runs[run_id] = RunTree(event)
            parent = self.runs.get(event["parent_ids"][-1]) if event["parent_ids"] else None
            if parent is not None:
                parent.child_runs.append(run)
            else:
                self._call(0, run)
        elif kind.endswith("_end") or kind.endswith("_error"):
            ended = self.runs.get(run_id)
            if ended is None:  # inside a root that already finished (left early)
                return
            ended.finish(event)
            if ended.parent_run_id is None or str(ended.parent_run_id) not in self.runs:
                for done in _subtree(ended):  # the root: forget it and its children
                    self.runs.pop(str(done.id), None)
                self._call(2 if kind.endswith("_error") else 1, ended)


def _subtree(run: RunTree) -> Iterator[RunTree]:
    stack = [run]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.child_runs)


def _takes_two(func: Callable[..., Any]) -> bool:
    try:
        return len(inspect.signature(func).parameters) >= 2
    except (TypeError, ValueError):
        return False


# ==============================================================================================
# 11. Retrieval
#
# A retriever is a step from a query to a list of documents (one chunk). The in-memory store
# with a lexical embedding lets the guide's retrieval example run with nothing installed.
# ==============================================================================================

class BaseRetriever(Runnable[str, List[Document]]):
    """A query in, documents out. Subclasses write `_get_relevant_documents(query)`.

    >>> class Keyword(BaseRetriever):
    ...     def _get_relevant_documents(self, query):
    ...         return [Document(t) for t in ["cats purr", "dogs bark"] if query in t]
    >>> Keyword().invoke("cats")
    [Document(metadata={}, page_content='cats purr')]
    """

    run_type = "retriever"
    input_in_start = True
    _user_code = True

    def _get_relevant_documents(self, query: str) -> List[Document]:
        raise NotImplementedError(f"{type(self).__name__} must implement _get_relevant_documents")

    async def _aget_relevant_documents(self, query: str) -> List[Document]:
        """Async twin; by default runs the sync one on a worker thread."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            None, ctx.run, self._get_relevant_documents, query)

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        yield self._get_relevant_documents(value)

    async def _aproduce(self, value: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        yield await self._aget_relevant_documents(value)

    def _event_input(self, value: Any, end: bool) -> Any:
        return {"query": value}

    def _own_metadata(self, config: RunnableConfig) -> Dict[str, Any]:
        name = type(self).__name__
        return {"ls_retriever_name": (name[:-9] if name.endswith("Retriever") else name).lower()}


class LexicalEmbeddings:
    """A zero-dependency embedding: hashed words and character trigrams, unit length.

    Texts sharing words (or word parts: "work", "worked") are close; nothing to download.

    >>> emb = LexicalEmbeddings()
    >>> q = emb.embed_query("where did harrison work?")
    >>> a, b = emb.embed_documents(["harrison worked at kensho", "harrison likes spicy food"])
    >>> _dot(q, a) > _dot(q, b)
    True
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size

    def embed_query(self, text: str) -> List[float]:
        """The vector of one text."""
        import zlib
        vector = [0.0] * self.size
        for word in re.findall(r"\w+", text.lower()):
            vector[zlib.crc32(word.encode()) % self.size] += 1.0
            padded = f"#{word}#"
            for i in range(len(padded) - 2):
                vector[zlib.crc32(padded[i:i + 3].encode()) % self.size] += 0.5
        norm = sum(v * v for v in vector) ** 0.5 or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        """The vectors of several texts."""
        return [self.embed_query(t) for t in texts]


def _dot(a: List[float], b: List[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


class InMemoryVectorStore:
    """Documents and their vectors by id; search by cosine similarity.

    Each stored document has an id (its own, one given, or a fresh uuid4); searches return
    copies that carry it, as langchain_core's store does.

    >>> store = InMemoryVectorStore.from_texts(["harrison worked at kensho",
    ...     "harrison likes spicy food"], embedding=LexicalEmbeddings())
    >>> store.as_retriever().invoke("where did harrison work?")[0].page_content
    'harrison worked at kensho'
    >>> store.add_texts(["kensho is in cambridge"], ids=["k1"])
    ['k1']
    """

    def __init__(self, embedding: Any) -> None:
        self.embedding = embedding
        self.items: Dict[str, Tuple[Document, List[float]]] = {}

    def add_documents(self, documents: List[Document], ids: Optional[List[str]] = None) -> List[str]:
        """Embed and store documents; returns their ids."""
        import uuid
        vectors = self.embedding.embed_documents([d.page_content for d in documents])
        ids = list(ids) if ids is not None else [d.id or str(uuid.uuid4()) for d in documents]
        for doc, id_, vector in zip(documents, ids, vectors):
            self.items[id_] = (Document(doc.page_content, metadata=dict(doc.metadata), id=id_), vector)
        return ids

    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[Dict[str, Any]]] = None,
                  ids: Optional[List[str]] = None) -> List[str]:
        """Embed and store texts (with optional metadata and ids per text); returns the ids."""
        texts = list(texts)
        metas = metadatas or [{} for _ in texts]
        return self.add_documents([Document(t, metadata=m) for t, m in zip(texts, metas)], ids)

    @classmethod
    def from_texts(cls, texts: Iterable[str], embedding: Any,
                   metadatas: Optional[List[Dict[str, Any]]] = None,
                   ids: Optional[List[str]] = None) -> "InMemoryVectorStore":
        """A store holding `texts`."""
        store = cls(embedding)
        store.add_texts(texts, metadatas, ids)
        return store

    def similarity_search_with_score(self, query: str, k: int = 4) -> List[Tuple[Document, float]]:
        """The `k` documents closest to `query` (fresh copies), with their cosine similarity."""
        q = self.embedding.embed_query(query)
        scored = sorted(((doc, _dot(q, vec)) for doc, vec in self.items.values()),
                        key=lambda pair: -pair[1])[:k]
        return [(Document(d.page_content, metadata=dict(d.metadata), id=d.id), s) for d, s in scored]

    def similarity_search(self, query: str, k: int = 4) -> List[Document]:
        """The `k` documents closest to `query`."""
        return [doc for doc, _ in self.similarity_search_with_score(query, k)]

    def as_retriever(self, search_kwargs: Optional[Dict[str, Any]] = None,
                     tags: Optional[List[str]] = None) -> "VectorStoreRetriever":
        """A retriever searching this store (`search_kwargs={"k": 2}` to return fewer). Its
        runs are tagged with the store's and the embedding's class names unless `tags` is given.

        >>> InMemoryVectorStore(LexicalEmbeddings()).as_retriever().tags
        ['InMemoryVectorStore', 'LexicalEmbeddings']
        """
        return VectorStoreRetriever(self, search_kwargs or {}, tags or [
            type(self).__name__, type(self.embedding).__name__])


class VectorStoreRetriever(BaseRetriever):
    """A retriever over a vector store.

    >>> store = InMemoryVectorStore.from_texts(["a b", "c d"], embedding=LexicalEmbeddings())
    >>> len(store.as_retriever(search_kwargs={"k": 1}).invoke("a"))
    1
    """

    def __init__(self, vectorstore: InMemoryVectorStore, search_kwargs: Dict[str, Any],
                 tags: Optional[List[str]] = None) -> None:
        self.vectorstore, self.search_kwargs = vectorstore, search_kwargs
        self.tags = list(tags or [])

    def _own_tags(self) -> List[str]:
        return self.tags

    def _get_relevant_documents(self, query: str) -> List[Document]:
        return self.vectorstore.similarity_search(query, **self.search_kwargs)

    def _own_metadata(self, config: RunnableConfig) -> Dict[str, Any]:
        return {"ls_retriever_name": "vectorstore",
                "ls_vector_store_provider": type(self.vectorstore).__name__,
                "ls_embedding_provider": type(self.vectorstore.embedding).__name__}


# ==============================================================================================
# 12. Tools
#
# A tool is a function a model can call: a name, a description, a JSON schema of its
# arguments. As a step it takes a string, a dict of arguments, or a tool call from a model.
# ==============================================================================================

class ToolException(Exception):
    """An error a tool reports; with `handle_tool_error` it becomes the tool's output.

    >>> @tool
    ... def lookup(key: str) -> str:
    ...     "Look a key up."
    ...     raise ToolException(f"no entry for {key!r}")
    >>> lookup.handle_tool_error = True
    >>> lookup.invoke("x")
    "no entry for 'x'"
    """


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object"}
_INJECTED = ("callbacks", "config", "run_manager")  # parameters minichain fills, not the model


class BaseTool(Runnable[Any, Any]):
    """A tool: `name`, `description`, `args_schema`; subclasses write `_run(**kwargs)`.

    Called with a dict of arguments, a string (for a one-argument tool), or a tool call
    (`{"name", "args", "id", "type": "tool_call"}`, answered with a `ToolMessage`).

    >>> class Add(BaseTool):
    ...     name, description = "add", "Add two numbers."
    ...     def _run(self, a: int, b: int) -> int:
    ...         return a + b
    >>> Add().invoke({"a": 1, "b": 2})
    3
    """

    run_type = "tool"
    input_in_start = True
    _user_code = True
    description = ""
    handle_tool_error: Union[bool, str, Callable[[ToolException], str]] = False

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"tool {self.get_name()} must implement _run")

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        """Async twin of `_run`; by default runs it on a worker thread."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: ctx.run(self._run, *args, **kwargs))

    def _signature(self) -> inspect.Signature:
        return inspect.signature(self._run)

    @property
    def args(self) -> Dict[str, Any]:
        """The JSON schema of each argument the model fills in."""
        return cast(Dict[str, Any], self.args_schema["properties"])

    @property
    def args_schema(self) -> Dict[str, Any]:
        """The JSON schema of the arguments, from the signature's annotations.

        >>> @tool
        ... def greet(name: str, times: int = 1) -> str:
        ...     "Greet someone."
        ...     return "hi " * times + name
        >>> greet.args_schema
        {'type': 'object', 'properties': {'name': {'type': 'string'}, 'times': {'type': 'integer', 'default': 1}}, 'required': ['name']}
        """
        import typing
        func = getattr(self, "func", None) or self._run
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        properties: Dict[str, Any] = {}
        required = []
        for p in self._signature().parameters.values():
            if p.name in _INJECTED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            hint = hints.get(p.name, p.annotation)
            origin = getattr(hint, "__origin__", hint)
            schema: Dict[str, Any] = {"type": _JSON_TYPES[origin]} if origin in _JSON_TYPES else {}
            if p.default is p.empty:
                required.append(p.name)
            else:
                schema["default"] = p.default
            properties[p.name] = schema
        return {"type": "object", "properties": properties, "required": required}

    def _arguments(self, value: Any) -> Tuple[Dict[str, Any], Optional[str]]:
        """The keyword arguments for `_run` and the tool-call id, from any accepted input."""
        call_id = None
        if isinstance(value, dict) and value.get("type") == "tool_call" and "args" in value:
            call_id, value = value.get("id"), value["args"]
        params = [p for p in self._signature().parameters.values() if p.name not in _INJECTED
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if isinstance(value, str):
            if len(params) != 1:
                raise TypeError(f"tool {self.get_name()} takes arguments "
                                f"{[p.name for p in params]}; call it with a dict of them, "
                                f"not the string {_short(value)}")
            value = {params[0].name: value}
        if not isinstance(value, dict):
            raise TypeError(f"tool {self.get_name()} takes a dict of arguments, a string or a "
                            f"tool call, not {type(value).__name__}: {_short(value)}")
        injected = {p: None for p in _INJECTED if p in self._signature().parameters}
        try:
            self._signature().bind(**value, **injected)
        except TypeError as exc:
            raise TypeError(f"tool {self.get_name()} was called with arguments "
                            f"{sorted(value)} but takes {[p.name for p in params]} ({exc})") from None
        return dict(value), call_id

    def _injected(self, config: RunnableConfig) -> Dict[str, Any]:
        params = self._signature().parameters
        extra: Dict[str, Any] = {}
        if "callbacks" in params:
            extra["callbacks"] = config.get("callbacks")
        if "config" in params:
            extra["config"] = config
        return extra

    def _failed(self, exc: Exception, config: RunnableConfig, value: Any) -> Any:
        """The output for a failed call: a handled `ToolException`, or else the error is
        reported as `on_tool_error` and raised unchanged."""
        handler = self.handle_tool_error
        if isinstance(exc, ToolException) and handler:
            if callable(handler):
                return handler(exc)
            return handler if isinstance(handler, str) else (str(exc) or "Tool execution error")
        run = config.get("callbacks")
        if isinstance(run, Run):
            call_id = value.get("id") if isinstance(value, dict) and "args" in value else None
            run.emit({"event": "on_tool_error", "data": {"error": exc, "input": self._event_input(value, end=True),
                                                        "tool_call_id": call_id},
                      "run_id": run.id, "name": run.name, "tags": run.tags,
                      "metadata": run.metadata, "parent_ids": run.parent_ids})
            run.failed = True  # every listener has it: no second error event
        raise exc

    def _wrap(self, result: Any, call_id: Optional[str]) -> Any:
        if call_id is None:
            return result
        content = result if isinstance(result, str) else json.dumps(result, default=str)
        return ToolMessage(content, name=self.get_name(), tool_call_id=call_id)

    def _produce(self, value: Any, config: RunnableConfig) -> Iterator[Any]:
        args, call_id = self._arguments(value)
        try:
            result = self._run(**args, **self._injected(config))
        except Exception as exc:
            result = self._failed(exc, config, value)
        yield self._wrap(result, call_id)

    async def _aproduce(self, value: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        args, call_id = self._arguments(value)
        try:
            result = await self._arun(**args, **self._injected(config))
        except Exception as exc:
            result = self._failed(exc, config, value)
        yield self._wrap(result, call_id)

    def _event_input(self, value: Any, end: bool) -> Any:
        if isinstance(value, dict):
            return value.get("args", value) if value.get("type") == "tool_call" else value
        return None if end else {}


class _FunctionTool(BaseTool):
    """A tool made from a function by `@tool`."""

    def __init__(self, func: Callable[..., Any], name: Optional[str] = None,
                 description: Optional[str] = None) -> None:
        self.func = func
        self.name = name or func.__name__
        self.description = description or inspect.getdoc(func) or ""
        if not self.description:
            raise ValueError(f"tool {self.name} needs a description: give the function a "
                             "docstring, or pass description=")

    def _signature(self) -> inspect.Signature:
        return inspect.signature(self.func)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(self.func):
            raise _sync_only(f"tool {self.name}", "invoke")
        return self.func(*args, **kwargs)

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(self.func):
            return await self.func(*args, **kwargs)
        return await BaseTool._arun(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"tool({self.name})"


def tool(func: Any = None, *, name: Optional[str] = None,
         description: Optional[str] = None) -> Any:
    """Decorator: a function as a tool, named after it and described by its docstring.

    `@tool`, `@tool("name")` and `@tool(description=...)` all work. Parameters named
    `callbacks` or `config` are filled by minichain, not by the model.

    >>> @tool
    ... def multiply(a: int, b: int) -> int:
    ...     "Multiply two numbers."
    ...     return a * b
    >>> multiply.name, multiply.description, multiply.invoke({"a": 6, "b": 7})
    ('multiply', 'Multiply two numbers.', 42)
    """
    if isinstance(func, str):
        return lambda f: _FunctionTool(f, name=func, description=description)
    if func is None:
        return lambda f: _FunctionTool(f, name=name, description=description)
    return _FunctionTool(func, name=name, description=description)


# ==============================================================================================
# 13. Model servers over HTTP: OpenAI-compatible, Ollama, Anthropic
#
# Bytes come in through a tiny transport (http.client for sync, asyncio streams for async);
# a framing decoder (SSE or NDJSON) turns them into frames and a protocol mapping turns frames
# into AIMessageChunks. Decoders and mappings are push machines shared by both transports.
# ==============================================================================================

class APIError(Exception):
    """A model server refused or broke off a request: `status` (None once streaming), the
    server's `message` and error `type`, and the raw `body`.

    >>> raise APIError("bad key", status=401, type="invalid_api_key", provider="OpenAI")
    Traceback (most recent call last):
    ...
    minichain.APIError: OpenAI returned HTTP 401 (invalid_api_key): bad key
    """

    def __init__(self, message: str, *, status: Optional[int] = None, type: Optional[str] = None,
                 body: Any = None, provider: str = "the server", reported: bool = False,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self.message, self.status, self.type, self.body = message, status, type, body
        self.headers: Mapping[str, str] = headers or {}
        kind = f" ({type})" if type else ""
        if status:
            text = f"{provider} returned HTTP {status}{kind}: {message}"
        elif reported:  # the server sent an error inside the stream
            text = f"{provider} reported an error mid-stream{kind}: {message}"
        else:  # minichain found the stream broken
            text = f"{provider}: {message}"
        super().__init__(text)


class APITimeoutError(APIError):
    """The server did not answer within the timeout (connect or read).

    >>> APITimeoutError("no answer in 5.0 s", provider="Ollama").message
    'no answer in 5.0 s'
    """


class APIConnectionError(APIError):
    """The connection failed or broke before an answer: refused, reset, closed, a name that
    does not resolve, a certificate that does not verify, or an answer that is not HTTP. The
    underlying error is `__cause__`; `retryable` says whether trying again can help.

    >>> APIConnectionError("cannot connect to 127.0.0.1:9: connection refused", provider="Ollama")
    APIConnectionError('Ollama: cannot connect to 127.0.0.1:9: connection refused')
    """

    retryable = True


class IncompleteStreamError(APIError):
    """The stream ended before the model said it was finished; the partial answer would be
    silently truncated, so this is raised instead.

    >>> IncompleteStreamError("no finish_reason", provider="OpenAI").status is None
    True
    """


_LINE_END = re.compile(rb"\r\n|\r|\n")
MAX_EVENT_BYTES = 8 * 2 ** 20  # the default cap on one stream line, event or record from a server
_ERROR_BODY_BYTES = 64 * 2 ** 10  # how much of an error answer's body is read and kept


def _too_large(limit: int, provider: str) -> APIError:
    return APIError(f"the server sent a stream line or event over {limit} bytes; minichain "
                    f"stopped reading there (pass max_event_bytes= to allow more)", provider=provider)


def _cut(provider: str) -> "IncompleteStreamError":
    return IncompleteStreamError("the stream ended in the middle of an event; the answer so "
                                 "far would be truncated", provider=provider)


class _SSEDecoder:
    r"""Server-sent events from bytes, as the WHATWG algorithm says: lines end in `\n`, `\r\n`
    or `\r`; `:` lines are comments; `data:` lines of one event join with `\n`; a blank line
    dispatches. Yields `(event, data)` pairs; an old-style `error:` line is an `error` event.

    >>> d = _SSEDecoder()
    >>> d.feed(b": ping\r\ndata: {\"a\"\r") + d.feed(b"\ndata:1}\n\nevent: x\ndata: y\n") + d.finish()
    [('message', '{"a"\n1}'), ('x', 'y')]
    >>> d = _SSEDecoder(provider="OpenAI"); _ = d.feed(b"data: {\"cho"); d.finish()
    Traceback (most recent call last):
    ...
    minichain.IncompleteStreamError: OpenAI: the stream ended in the middle of an event; the answer so far would be truncated
    """

    def __init__(self, limit: int = MAX_EVENT_BYTES, provider: str = "the server",
                 named_empty: bool = False) -> None:
        self.named_empty = named_empty  # dispatch an event with a name and no data (LangServe's end)
        self.pending: List[bytes] = []  # an incomplete line
        self.pending_size = 0
        self.event = ""
        self.data: List[str] = []
        self.data_size = 0
        self.first = True  # a byte-order mark may start the stream
        self.limit, self.provider = limit, provider

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        if not _LINE_END.search(data) or data.endswith(b"\r") and not _LINE_END.search(data[:-1]):
            self.pending.append(data)  # no line ends yet (a final \r may be half of \r\n)
            self.pending_size += len(data)
            if self.pending_size > self.limit:
                raise _too_large(self.limit, self.provider)
            return []
        buffer = b"".join(self.pending) + data
        self.pending, self.pending_size = [], 0
        out: List[Tuple[str, str]] = []
        start = 0
        for m in _LINE_END.finditer(buffer):
            if m.group() == b"\r" and m.end() == len(buffer):
                break  # wait: the \n of a \r\n may come next
            self._line(buffer[start:m.start()], out)
            start = m.end()
        if start < len(buffer):
            self.pending.append(buffer[start:])
            self.pending_size = len(buffer) - start
            if self.pending_size > self.limit:
                raise _too_large(self.limit, self.provider)
        return out

    def finish(self) -> List[Tuple[str, str]]:
        """The end of the body: an event whose blank line is missing still counts, but a body
        that stops inside a line was cut (`IncompleteStreamError`)."""
        if self.pending and b"".join(self.pending).rstrip(b"\r"):
            raise _cut(self.provider)
        self.pending = []
        out: List[Tuple[str, str]] = []
        self._line(b"", out)
        return out

    def _line(self, raw: bytes, out: List[Tuple[str, str]]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if self.first:
            line, self.first = line.lstrip("\ufeff"), False
        if not line:
            if self.data or (self.event and self.named_empty):
                out.append((self.event or "message", "\n".join(self.data)))
            self.event, self.data, self.data_size = "", [], 0
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self.data.append(value)
            self.data_size += len(value)
            if self.data_size > self.limit:
                raise _too_large(self.limit, self.provider)
        elif field == "event":
            self.event = value
        elif field == "error":  # llama.cpp before Sept 2025
            out.append(("error", value))


class _NDJSONDecoder:
    r"""Lines of JSON from bytes (Ollama): split on `\n` only, blank lines skipped.

    >>> d = _NDJSONDecoder()
    >>> d.feed(b'{"a": 1}\n{"b"') + d.feed(b': 2}\n\n') + d.finish()
    [('message', '{"a": 1}'), ('message', '{"b": 2}')]
    """

    def __init__(self, limit: int = MAX_EVENT_BYTES, provider: str = "the server") -> None:
        self.pending: List[bytes] = []
        self.pending_size = 0
        self.limit, self.provider = limit, provider

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        if b"\n" not in data:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.limit:
                raise _too_large(self.limit, self.provider)
            return []
        *lines, rest = (b"".join(self.pending) + data).split(b"\n")
        if any(len(line) > self.limit for line in lines) or len(rest) > self.limit:
            raise _too_large(self.limit, self.provider)
        self.pending, self.pending_size = ([rest], len(rest)) if rest else ([], 0)
        return [("message", line.decode("utf-8", errors="replace").strip())
                for line in lines if line.strip()]

    def finish(self) -> List[Tuple[str, str]]:
        """A last record without its newline counts if it is whole JSON; else it was cut."""
        rest = b"".join(self.pending).decode("utf-8", errors="replace").strip()
        self.pending = []
        if not rest:
            return []
        try:
            json.loads(rest)
        except ValueError:
            raise _cut(self.provider) from None
        return [("message", rest)]


def _payload(data: str, provider: str) -> Dict[str, Any]:
    """A frame's JSON object; a malformed one is an error that shows the line."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise APIError(f"malformed stream line {_short(data, 200)}: {exc}", provider=provider) from None
    if not isinstance(value, dict):
        raise APIError(f"malformed stream line {_short(data, 200)}: expected a JSON object",
                       provider=provider)
    return value


def _raise_if_error(payload: Dict[str, Any], provider: str, status: Optional[int] = None) -> None:
    """Raise for any of the error shapes servers send: `{"error": {...}}`, `{"error": "..."}`,
    vLLM's `{"object": "error", ...}`, Anthropic's `{"type": "error", "error": {...}}`."""
    error = payload.get("error")
    if error is None and payload.get("object") == "error":
        error = payload
    if error is None:
        return
    if isinstance(error, dict):
        message = str(error.get("message") or json.dumps(error))
        kind = error.get("type") or (str(error["code"]) if error.get("code") is not None else None)
    else:
        message, kind = str(error), None
    raise APIError(message, status=status, type=kind, body=payload, provider=provider,
                   reported=True)


def _usage(input_tokens: Optional[int], output_tokens: Optional[int],
           **details: Any) -> Optional[Dict[str, Any]]:
    if input_tokens is None and output_tokens is None:
        return None  # the server did not say: None, not zeros
    usage: Dict[str, Any] = {"input_tokens": input_tokens or 0, "output_tokens": output_tokens or 0,
                             "total_tokens": (input_tokens or 0) + (output_tokens or 0)}
    usage.update({k: v for k, v in details.items() if v})
    return usage


class _OpenAIStream:
    """Chat Completions chunks -> AIMessageChunks (text, tool-call fragments, usage)."""

    provider = "OpenAI"

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: Optional[str] = None
        self.tool_ids: Dict[int, str] = {}  # index -> the id first seen for it
        self.remap: Dict[Tuple[int, str], int] = {}  # (index, id) -> index, for reused indexes

    def frame(self, event: str, data: str) -> List[AIMessageChunk]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        payload = _payload(data, self.provider)
        if event == "error" and "error" not in payload:  # an old llama.cpp `error:` line
            payload = {"error": payload}
        _raise_if_error(payload, self.provider)
        chunks = []
        for choice in payload.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}  # Azure content-filter choices have no delta
            calls = [self._tool_chunk(call) for call in delta.get("tool_calls") or []]
            meta: Dict[str, Any] = {}
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                meta = {"finish_reason": self.finish_reason, "model_name": payload.get("model")}
            content = delta.get("content") or ""
            if content or calls or meta or "role" in delta:
                chunks.append(AIMessageChunk(content, id=payload.get("id") or None,
                                             tool_call_chunks=calls, response_metadata=meta))
        usage = payload.get("usage")
        if usage:
            details = {"input_token_details": {"cache_read": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}
                       if (usage.get("prompt_tokens_details") or {}).get("cached_tokens") else None,
                       "output_token_details": {"reasoning": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")}
                       if (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") else None}
            chunks.append(AIMessageChunk("", id=payload.get("id") or None, usage_metadata=_usage(
                usage.get("prompt_tokens"), usage.get("completion_tokens"), **details)))
        return chunks

    def _tool_chunk(self, call: Dict[str, Any]) -> Dict[str, Any]:
        index, call_id = call.get("index", 0), call.get("id")
        if call_id:  # Ollama's /v1 reuses index 0 for parallel calls, told apart by id
            first = self.tool_ids.setdefault(index, call_id)
            if first != call_id:
                index = self.remap.setdefault((index, call_id), max(self.tool_ids) + 1 + len(self.remap))
        function = call.get("function") or {}
        return {"name": function.get("name"), "args": function.get("arguments") or "",
                "id": call_id, "index": index}

    def finish(self) -> None:
        if not self.done and self.finish_reason is None:
            raise IncompleteStreamError(
                "the stream ended before the model finished (no finish_reason and no [DONE]); "
                "the answer so far would be truncated", provider=self.provider)


class _OllamaStream:
    """Ollama /api/chat NDJSON lines -> AIMessageChunks."""

    provider = "Ollama"

    def __init__(self) -> None:
        self.done, self.calls = False, 0

    def frame(self, event: str, data: str) -> List[AIMessageChunk]:
        payload = _payload(data, self.provider)
        _raise_if_error(payload, self.provider)  # mid-stream errors come with no `done`
        message = payload.get("message") or {}
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments")
            calls.append({"name": function.get("name"), "id": call.get("id"), "index": self.calls,
                          "args": arguments if isinstance(arguments, str) else json.dumps(arguments or {})})
            self.calls += 1
        meta: Dict[str, Any] = {}
        usage = None
        if payload.get("done"):
            self.done = True
            meta = {"model_name": payload.get("model"), "done_reason": payload.get("done_reason"),
                    "finish_reason": payload.get("done_reason")}
            usage = _usage(payload.get("prompt_eval_count"), payload.get("eval_count"))
        content = message.get("content") or ""
        if not (content or calls or meta):
            return []
        return [AIMessageChunk(content, tool_call_chunks=calls, response_metadata=meta,
                               usage_metadata=usage)]

    def finish(self) -> None:
        if not self.done:
            raise IncompleteStreamError("the stream ended before a line with \"done\": true; "
                                        "the answer so far would be truncated", provider=self.provider)


class _AnthropicStream:
    """Anthropic Messages events -> AIMessageChunks (text, tool_use input JSON, usage)."""

    provider = "Anthropic"

    def __init__(self) -> None:
        self.done = False
        self.id: Optional[str] = None
        self.model: Optional[str] = None
        self.input_tokens: Optional[int] = None
        self.output_tokens: Optional[int] = None
        self.stop: Dict[str, Any] = {}

    def frame(self, event: str, data: str) -> List[AIMessageChunk]:
        if event == "ping":
            return []
        payload = _payload(data, self.provider)
        _raise_if_error(payload, self.provider)
        kind = payload.get("type") or event
        if kind == "message_start":
            message = payload.get("message") or {}
            self.id, self.model = message.get("id"), message.get("model")
            self.input_tokens = (message.get("usage") or {}).get("input_tokens")
        elif kind == "content_block_start":
            block = payload.get("content_block") or {}
            if block.get("type") == "tool_use":
                return [AIMessageChunk("", id=self.id, tool_call_chunks=[{
                    "name": block.get("name"), "id": block.get("id"), "args": "",
                    "index": payload.get("index", 0)}])]
            if block.get("type") == "text" and block.get("text"):
                return [AIMessageChunk(block["text"], id=self.id)]
        elif kind == "content_block_delta":
            delta = payload.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [AIMessageChunk(delta.get("text", ""), id=self.id)]
            if delta.get("type") == "input_json_delta":
                return [AIMessageChunk("", id=self.id, tool_call_chunks=[{
                    "name": None, "id": None, "args": delta.get("partial_json", ""),
                    "index": payload.get("index", 0)}])]
        elif kind == "message_delta":
            self.stop.update({k: v for k, v in (payload.get("delta") or {}).items() if v is not None})
            usage = payload.get("usage") or {}
            self.output_tokens = usage.get("output_tokens", self.output_tokens)  # cumulative
        elif kind == "message_stop":
            self.done = True
            meta = {"stop_reason": self.stop.get("stop_reason"), "model_name": self.model}
            if "stop_sequence" in self.stop:
                meta["stop_sequence"] = self.stop["stop_sequence"]
            return [AIMessageChunk("", id=self.id, response_metadata=meta,
                                   usage_metadata=_usage(self.input_tokens, self.output_tokens))]
        return []

    def finish(self) -> None:
        if not self.done:
            raise IncompleteStreamError("the stream ended before message_stop; the answer so "
                                        "far would be truncated", provider=self.provider)


def _http_error(status: int, headers: Mapping[str, str], body: bytes, provider: str) -> APIError:
    """The error for a non-2xx answer, with the server's message and type when it gave them.
    Only the first `_ERROR_BODY_BYTES` of the body are read and kept (a proxy's error page
    can be any size)."""
    cut = len(body) > _ERROR_BODY_BYTES
    text = body[:_ERROR_BODY_BYTES].decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    error = None
    if isinstance(payload, dict):
        try:
            _raise_if_error(payload, provider, status)
        except APIError as exc:
            error = exc
    if error is None:
        message = text or "(empty body)"
        if len(message) > 2000 or cut:  # an HTML page from a proxy: keep the start
            message = f"{message[:2000]}... (the body is {'over ' if cut else ''}{len(text)} characters)"
        error = APIError(message, status=status, body=text, provider=provider)
    error.headers = headers
    return error


def _retry_after(exc: BaseException, attempt: int, req: "_Request") -> float:
    """Seconds to wait before trying again after `exc`; raises it (as an APIError) when it is
    not worth retrying. Retried: 408, 409, 429 and 5xx answers (not `insufficient_quota`, not
    `x-should-retry: false`) and refused connections, `max_retries` times; the server's
    retry-after wins, else 0.5 s, 1 s, 2 s ... 8 s with jitter."""
    import random
    retry = attempt < req.max_retries and not isinstance(exc, APITimeoutError)
    if isinstance(exc, APIConnectionError):
        if not (retry and exc.retryable):
            raise exc
    elif isinstance(exc, APIError):
        status, headers = exc.status, exc.headers
        if not retry or status is None or not (status in (408, 409, 429) or status >= 500) \
                or headers.get("x-should-retry") == "false" or exc.type == "insufficient_quota":
            raise exc
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                return min(60.0, max(0.0, float(headers[name]) * scale))
            except (KeyError, ValueError):
                pass
    else:
        raise exc
    return min(8.0, 0.5 * 2.0 ** attempt) * random.uniform(0.75, 1.0)


def _broken(exc: BaseException, req: "_Request") -> APIConnectionError:
    """A transport failure before the answer, as an `APIConnectionError` (both transports):
    a refused, reset or closed connection is worth retrying; a name that does not resolve,
    a certificate that does not verify, or an answer that is not HTTP is not."""
    import socket
    import ssl
    where, retryable = f"{req.host}:{req.port}", True
    if isinstance(exc, socket.gaierror):
        what, retryable = f"cannot resolve the host name {req.host!r}: {exc}", False
    elif isinstance(exc, ssl.SSLCertVerificationError):
        what, retryable = f"the TLS certificate of {where} does not verify: {exc}", False
    elif isinstance(exc, (ConnectionResetError, EOFError)):
        what = f"the connection to {where} closed before the answer: {exc or type(exc).__name__}"
    elif isinstance(exc, OSError):
        what = f"cannot connect to {where}: {exc}"
    else:  # http.client.HTTPException, or a malformed line for the async reader
        what, retryable = f"{where} did not answer in HTTP/1.1: {_short(str(exc), 200)}", False
    error = APIConnectionError(what, provider=req.provider)
    error.retryable, error.__cause__ = retryable, exc
    return error


class _Request:
    """One streaming POST: where, what, and how patiently."""

    def __init__(self, url: str, headers: Dict[str, str], body: Dict[str, Any],
                 timeout: Tuple[float, float], max_retries: int, provider: str) -> None:
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{provider} URL {url!r} is not an http(s) URL; pass e.g. "
                             "base_url='http://localhost:8080/v1'")
        self.tls = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.tls else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                        "Connection": "close", "User-Agent": f"minichain/{__version__}", **headers}
        _check_header("URL", url, provider)
        for name, value in self.headers.items():
            _check_header(name, value, provider, header=True)
        self.body = json.dumps(body).encode()
        self.connect_timeout, self.read_timeout = timeout
        self.max_retries, self.provider = max_retries, provider

    def timed_out(self, what: str, seconds: Optional[float] = None) -> APITimeoutError:
        return APITimeoutError(f"no {what} from {self.host}:{self.port} within "
                               f"{self.read_timeout if seconds is None else seconds} s",
                               provider=self.provider)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF and the rest; tab is allowed


def _check_header(name: str, value: Any, provider: str, header: bool = False) -> None:
    """Refuse a header (or request path) holding control characters before any connection:
    CR/LF would start headers of the attacker's choosing. The value may be a secret, so the
    message names the header and the character, never the value.

    >>> _check_header("Authorization", "Bearer sk-123\\n", "OpenAI", header=True)
    Traceback (most recent call last):
    ...
    ValueError: OpenAI: the Authorization header has a newline (\\n) at its end; strip it (a key read from a file often ends with one: key.strip())
    """
    if header and (not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name)):
        raise ValueError(f"{provider}: {_short(name, 40)} is not a valid header name")
    if not isinstance(value, str):
        raise TypeError(f"{provider}: the {name} header must be a str, not {type(value).__name__}")
    bad = _CONTROL.search(value)
    if bad is None:
        return
    char = {"\n": "a newline (\\n)", "\r": "a carriage return (\\r)"}.get(
        bad.group(), f"the control character {bad.group()!r}")
    what = f"the {name} header" if header else f"the {name}"
    if bad.start() >= len(value.rstrip("\r\n")):
        raise ValueError(f"{provider}: {what} has {char} at its end; strip it (a key read from "
                         "a file often ends with one: key.strip())")
    raise ValueError(f"{provider}: {what} has {char} inside it; header values cannot hold "
                     "control characters: check where the value comes from")


def _open_sync(req: _Request, live: List[Any]) -> Tuple[Any, Any]:
    """Connect, send, and read the status and headers (raising APIError for non-2xx); the
    socket is put in `live` once connected, so that a consumer who leaves can shut it."""
    import http.client
    import socket
    cls = http.client.HTTPSConnection if req.tls else http.client.HTTPConnection
    conn = cls(req.host, req.port, timeout=req.connect_timeout)
    try:
        conn.connect()
        live[:] = [conn.sock]  # kept: the connection lets go of it once the response has it
        conn.sock.settimeout(req.read_timeout)  # generous: a long prompt delays the first token
        conn.request("POST", req.path, body=req.body, headers=req.headers)
        resp = conn.getresponse()
        if resp.status >= 300:
            headers = {k.lower(): v for k, v in resp.getheaders()}
            try:
                body = resp.read(_ERROR_BODY_BYTES + 1)
            finally:
                resp.close()
            raise _http_error(resp.status, headers, body, req.provider)
        return conn, resp
    except socket.timeout:
        conn.close()
        raise req.timed_out("answer") from None
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise _broken(exc, req) from exc
    except BaseException:
        conn.close()
        raise


def _post_stream(req: _Request) -> Iterator[bytes]:
    """The response body of a streaming POST, as bytes arrive; retried only before the first
    byte of the body. Closing the iterator closes the connection; so does the consumer of an
    event stream leaving while we wait on a silent server (`_when_stopped`)."""
    import http.client
    import socket
    live: List[Any] = []
    forget = _when_stopped(lambda: _shutdown(live))
    try:
        for attempt in itertools.count():
            try:
                conn, resp = _open_sync(req, live)
                break
            except APIError as exc:
                delay = _retry_after(exc, attempt, req)  # raises when it is not worth retrying
            time.sleep(delay)
    except BaseException:
        forget()
        raise
    try:
        while True:
            try:
                data = resp.read1(65536)
            except socket.timeout:
                raise req.timed_out("data") from None
            except (OSError, http.client.HTTPException) as exc:
                raise _broke_off(exc, req) from exc
            if not data:
                return
            yield data
    finally:
        forget()
        resp.close()
        conn.close()


def _broke_off(exc: BaseException, req: "_Request") -> "IncompleteStreamError":
    """A transport failure once the answer was streaming (both transports): never retried,
    since the model has already started; the partial answer is not passed off as whole."""
    return IncompleteStreamError(f"the connection to {req.host}:{req.port} broke off mid-stream: "
                                 f"{_short(str(exc) or type(exc).__name__, 200)}", provider=req.provider)


def _shutdown(live: List[Any]) -> None:
    """Shut the open socket from another thread: a read blocked on it returns at once."""
    import socket
    for sock in live:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


async def _within(awaitable: Awaitable[T], seconds: float, req: _Request, what: str) -> T:
    """`await awaitable`, or APITimeoutError after `seconds`. (Not asyncio.wait_for: before
    Python 3.12 it can swallow a cancellation that arrives together with the result.)"""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except BaseException:  # cancelled: take the read down with us
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise req.timed_out(what, seconds)
    return task.result()


async def _areadline(reader: Any, req: _Request) -> str:
    line = await _within(reader.readline(), req.read_timeout, req, "data")
    return cast(bytes, line).decode("latin-1").rstrip("\r\n")


async def _abody(reader: Any, headers: Dict[str, str], req: _Request) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive: chunked, sized, or until the server closes."""
    async def read(n: int) -> bytes:
        return cast(bytes, await _within(reader.read(n), req.read_timeout, req, "data"))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await _areadline(reader, req)).split(";")[0].strip() or "0", 16)
            if size == 0:
                return
            while size:
                data = await read(min(size, 65536))
                if not data:
                    return
                size -= len(data)
                yield data
            await _areadline(reader, req)  # the CRLF after each chunk
    remaining = int(headers["content-length"]) if "content-length" in headers else -1
    while remaining:
        data = await read(65536 if remaining < 0 else min(remaining, 65536))
        if not data:
            return
        remaining = max(0, remaining - len(data)) if remaining > 0 else remaining
        yield data


async def _aopen(req: _Request) -> Tuple[Any, Any, Dict[str, str]]:
    """Async twin of `_open_sync`, on asyncio streams (a small HTTP/1.1 client)."""
    ssl_context = None
    if req.tls:
        import ssl
        ssl_context = ssl.create_default_context()
    try:
        reader, writer = await _within(asyncio.open_connection(
            req.host, req.port, ssl=ssl_context, server_hostname=req.host if req.tls else None,
            limit=2 ** 20), req.connect_timeout, req, "connection")
    except OSError as exc:
        raise _broken(exc, req) from exc
    try:
        host = f"[{req.host}]" if ":" in req.host else req.host  # an IPv6 address
        head = [f"POST {req.path} HTTP/1.1", f"Host: {host}:{req.port}",
                f"Content-Length: {len(req.body)}"] + [f"{k}: {v}" for k, v in req.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + req.body)
        await writer.drain()
        status = 100
        while status < 200:  # skip 1xx answers
            status_line = await _areadline(reader, req)
            if not status_line:
                raise ConnectionResetError("no status line")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"malformed HTTP status line {_short(status_line, 100)}")
            status, headers = int(parts[1]), {}
            while True:
                line = await _areadline(reader, req)
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status >= 300:
            body = b""
            async for data in _abody(reader, headers, req):
                body += data
                if len(body) > _ERROR_BODY_BYTES:
                    break
            raise _http_error(status, headers, body, req.provider)
        return reader, writer, headers
    except (OSError, ValueError, EOFError) as exc:
        writer.close()
        raise _broken(exc, req) from exc
    except BaseException:
        writer.close()
        raise


async def _apost_stream(req: _Request) -> AsyncIterator[bytes]:
    """Async twin of `_post_stream`; the event loop never blocks, and closing (or cancelling)
    closes the socket at once."""
    for attempt in itertools.count():
        try:
            reader, writer, headers = await _aopen(req)
            break
        except APIError as exc:
            delay = _retry_after(exc, attempt, req)  # raises when it is not worth retrying
        await asyncio.sleep(delay)
    body = _abody(reader, headers, req)
    try:
        while True:
            try:
                data = await _anext(body)
            except (OSError, ValueError, EOFError) as exc:
                raise _broke_off(exc, req) from exc
            if data is _MISSING:
                return
            yield data
    finally:
        await _aclose(body)
        writer.close()


def _tool_spec(tool_like: Any) -> Dict[str, Any]:
    """A tool's name, description and JSON schema, from a tool, a function or a dict."""
    if isinstance(tool_like, dict):
        spec = tool_like.get("function", tool_like)
        return {"name": spec["name"], "description": spec.get("description", ""),
                "parameters": spec.get("parameters") or spec.get("input_schema")
                or {"type": "object", "properties": {}}}
    if not isinstance(tool_like, BaseTool):
        if not callable(tool_like):
            raise TypeError(f"bind_tools takes tools, functions or JSON-schema dicts, not "
                            f"{type(tool_like).__name__}: {_short(tool_like)}")
        tool_like = _FunctionTool(tool_like)
    return {"name": tool_like.get_name(), "description": tool_like.description,
            "parameters": tool_like.args_schema}


def _text(content: Any) -> str:
    return content if isinstance(content, str) else BaseMessage(content).text


def _openai_messages(messages: List[BaseMessage]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for m in messages:
        if isinstance(m, ToolMessage):
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": _text(m.content)})
        elif isinstance(m, AIMessage):
            item: Dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                item["content"] = m.content or None
                item["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": json.dumps(c["args"])}} for c in m.tool_calls]
            out.append(item)
        else:
            out.append({"role": "system" if m.type == "system" else "user", "content": m.content})
    return out


def _ollama_messages(messages: List[BaseMessage]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for m in messages:
        item: Dict[str, Any] = {"role": {"human": "user", "ai": "assistant"}.get(m.type, m.type),
                                "content": _text(m.content)}
        if isinstance(m, AIMessage) and m.tool_calls:
            item["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["args"]}}
                                  for c in m.tool_calls]
        if isinstance(m, ToolMessage) and m.name:
            item["tool_name"] = m.name
        out.append(item)
    return out


def _anthropic_messages(messages: List[BaseMessage]) -> Tuple[str, List[Dict[str, Any]]]:
    """The system text and the user/assistant turns (consecutive turns of one role merged)."""
    system = "\n\n".join(m.text for m in messages if m.type == "system")
    turns: List[Dict[str, Any]] = []
    for m in messages:
        if m.type == "system":
            continue
        content: Any
        if isinstance(m, ToolMessage):
            role, content = "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id,
                                      "content": _text(m.content)}]
        elif isinstance(m, AIMessage) and m.tool_calls:
            role = "assistant"
            content = ([{"type": "text", "text": m.text}] if m.text else []) + [
                {"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["args"]}
                for c in m.tool_calls]
        else:
            role, content = ("assistant" if m.type == "ai" else "user"), m.content
        if turns and turns[-1]["role"] == role:  # the API wants roles to alternate
            turns[-1]["content"] = _as_blocks(turns[-1]["content"]) + _as_blocks(content)
        else:
            turns.append({"role": role, "content": content})
    return system, turns


def _read_frames(body: Iterator[bytes], decoder: Any, reader: Any) -> Iterator[Any]:
    """What `reader` makes of the frames `decoder` finds in a response `body`, as bytes arrive;
    it stops reading when the reader is done (closing `body` closes the connection)."""
    try:
        for data in body:
            for event, text in decoder.feed(data):
                yield from reader.frame(event, text)
                if reader.done:
                    return
        for event, text in decoder.finish():
            yield from reader.frame(event, text)
        reader.finish()
    finally:
        _close(body)


async def _aread_frames(body: AsyncIterator[bytes], decoder: Any, reader: Any) -> AsyncIterator[Any]:
    """Async twin of `_read_frames`."""
    try:
        async for data in body:
            for event, text in decoder.feed(data):
                for value in reader.frame(event, text):
                    yield value
                if reader.done:
                    return
        for event, text in decoder.finish():
            for value in reader.frame(event, text):
                yield value
        reader.finish()
    finally:
        await _aclose(body)


def _timeouts(timeout: Union[None, float, Tuple[float, float]]) -> Tuple[float, float]:
    """(connect, read) seconds from a number, a pair or None (10 s; 600 s: a long prompt can
    take minutes on a CPU)."""
    if timeout is None:
        return 10.0, 600.0
    if isinstance(timeout, tuple):
        return float(timeout[0]), float(timeout[1])
    return float(timeout), float(timeout)


if TYPE_CHECKING:
    _ServerBase = BaseChatModel
else:
    _ServerBase = object


class _ServerChatModel(_ServerBase):
    """What the three server models share (a mixin, so that each model stays a direct
    subclass of `BaseChatModel`): the request, the transport, the stream loop.

    A provider is mostly data: its endpoint, the environment variables it reads, how its
    stream is framed (`decoder`) and read into chunks (`reader`). Its code is what differs
    in logic: the request body (`_body`, which takes the extra keyword arguments) and the
    headers (`_headers`, which check the key).
    """

    provider = "server"
    path = ""  # the endpoint, after base_url
    key_env: Optional[str] = None  # where api_key comes from when not given
    url_env: Optional[str] = None  # where base_url comes from when not given
    default_url = ""  # ... and else
    decoder: Callable[[int, str], Any] = _SSEDecoder  # bytes -> (event, data) frames
    reader: Callable[[], Any] = _OpenAIStream  # frames -> AIMessageChunks

    def __init__(self, *, model: str, base_url: Optional[str] = None,
                 api_key: Optional[str] = None, timeout: Union[None, float, Tuple[float, float]] = None, max_retries: int = 2,
                 max_event_bytes: int = MAX_EVENT_BYTES,
                 tags: Optional[List[str]] = None, metadata: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        super().__init__(tags=tags, metadata=metadata, **kwargs)
        for name, value in (("max_retries", max_retries), ("max_event_bytes", max_event_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (name == "max_event_bytes"):
                raise TypeError(f"{type(self).__name__}: {name} must be an int >= "
                                f"{int(name == 'max_event_bytes')}, not {_short(value)}")
        self.max_event_bytes = max_event_bytes
        self.model = model
        self.api_key = api_key or (os.environ.get(self.key_env) if self.key_env else None)
        url = base_url or (os.environ.get(self.url_env) if self.url_env else None) or self.default_url
        self.base_url = url.rstrip("/")
        self.timeout = _timeouts(timeout)
        self.max_retries = max_retries
        self.tools: List[Dict[str, Any]] = []
        self.tool_choice: Any = None

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None) -> "_ServerChatModel":
        """A copy of this model that offers `tools` (tools, functions or schemas) to the model.

        >>> @tool
        ... def get_weather(city: str) -> str:
        ...     "Get the weather for a city."
        ...     return "sunny"
        >>> ChatOpenAI(model="m", base_url="http://x/v1").bind_tools([get_weather]).tools
        [{'name': 'get_weather', 'description': 'Get the weather for a city.', 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}]
        """
        import copy
        bound = copy.copy(self)
        bound.tools, bound.tool_choice = [_tool_spec(t) for t in tools], tool_choice
        return bound

    def _body(self, messages: List[BaseMessage], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def _headers(self) -> Dict[str, str]:
        raise NotImplementedError

    def _request(self, messages: List[BaseMessage], **kwargs: Any) -> _Request:
        return _Request(self.base_url + self.path, self._headers(), self._body(messages, kwargs),
                        self.timeout, self.max_retries, self.provider)

    def _stream(self, messages: List[BaseMessage], **kwargs: Any) -> Iterator[AIMessageChunk]:
        decoder, reader = self.decoder(self.max_event_bytes, self.provider), self.reader()
        return _read_frames(_post_stream(self._request(messages, **kwargs)), decoder, reader)

    def _astream(self, messages: List[BaseMessage], **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        decoder, reader = self.decoder(self.max_event_bytes, self.provider), self.reader()
        return _aread_frames(_apost_stream(self._request(messages, **kwargs)), decoder, reader)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"


class ChatOpenAI(_ServerChatModel, BaseChatModel):
    """A chat model on any OpenAI-compatible Chat Completions server: OpenAI, vLLM,
    llama.cpp, llama-cpp-python, Ollama's /v1, LM Studio, OpenRouter, Azure-style servers.

    `api_key` and `base_url` default to `OPENAI_API_KEY` and `OPENAI_BASE_URL`; a local
    server needs no key. `timeout` is seconds, or `(connect, read)`; `max_retries` retries
    429/5xx/408 answers before the stream starts. Other keywords go into the request body.

    >>> model = ChatOpenAI(model="gpt-4o-mini", base_url="http://localhost:8080/v1", temperature=0)
    >>> model._request([HumanMessage("hi")]).path
    '/v1/chat/completions'
    """

    provider, path, reader = "OpenAI", "/chat/completions", _OpenAIStream
    key_env, url_env, default_url = "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"

    def __init__(self, *, model: str = "gpt-4o-mini", base_url: Optional[str] = None,
                 api_key: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(model=model, base_url=base_url, api_key=api_key, **kwargs)

    def _body(self, messages: List[BaseMessage], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"model": self.model, "messages": _openai_messages(messages),
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t} for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = choice if choice in ("auto", "none", "required") or \
                not isinstance(choice, str) else {"type": "function", "function": {"name": choice}}
        return {**body, **kwargs}

    def _headers(self) -> Dict[str, str]:
        if not self.api_key and "api.openai.com" in self.base_url:
            raise ValueError("ChatOpenAI needs an API key for api.openai.com: set "
                             "OPENAI_API_KEY or pass api_key=...; for a local server pass base_url=")
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


_OLLAMA_OPTIONS = ("temperature", "top_p", "top_k", "num_predict", "num_ctx", "seed", "stop",
                   "repeat_penalty", "mirostat")


class ChatOllama(_ServerChatModel, BaseChatModel):
    """A chat model on Ollama's native `/api/chat` (NDJSON). `base_url` defaults to
    `OLLAMA_HOST`, else http://localhost:11434. Sampling options (temperature, num_predict,
    seed, ...) go into `options`; other keywords (format, keep_alive, think) into the body.

    >>> ChatOllama(model="llama3.2", base_url="localhost:11434")._request([HumanMessage("hi")]).path
    '/api/chat'
    """

    provider, path, decoder, reader = "Ollama", "/api/chat", _NDJSONDecoder, _OllamaStream
    url_env, default_url = "OLLAMA_HOST", "http://localhost:11434"

    def __init__(self, *, model: str = "llama3.2", base_url: Optional[str] = None, **kwargs: Any) -> None:
        if "api_key" in kwargs:
            raise TypeError("ChatOllama takes no api_key: Ollama's API has none (a proxy that "
                            "wants one: ChatOpenAI(base_url='http://host:11434/v1', api_key=...))")
        super().__init__(model=model, base_url=base_url, **kwargs)
        url = self.base_url if "://" in self.base_url else f"http://{self.base_url}"
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        if parts.port is None and parts.scheme == "http" and parts.hostname:  # Ollama's port
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            url = urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:11434"))
        self.base_url = url

    def _body(self, messages: List[BaseMessage], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"model": self.model, "messages": _ollama_messages(messages),
                                "stream": True}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t} for t in self.tools]
        options = {k: v for k, v in kwargs.items() if k in _OLLAMA_OPTIONS}
        body.update({k: v for k, v in kwargs.items() if k not in _OLLAMA_OPTIONS})
        if options:
            body["options"] = options
        return body

    def _headers(self) -> Dict[str, str]:
        return {"Accept": "application/x-ndjson"}


class ChatAnthropic(_ServerChatModel, BaseChatModel):
    """A chat model on Anthropic's Messages API (streamed). `api_key` defaults to
    `ANTHROPIC_API_KEY`; `max_tokens` (required by the API) to 1024. System messages become
    the `system` field; tool results go back as `tool_result` blocks.

    >>> req = ChatAnthropic(model="claude-sonnet-4-5", api_key="k")._request([SystemMessage("s"), HumanMessage("hi")])
    >>> json.loads(req.body)["system"], req.headers["anthropic-version"]
    ('s', '2023-06-01')
    """

    provider, path, reader = "Anthropic", "/v1/messages", _AnthropicStream
    key_env, url_env, default_url = "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "https://api.anthropic.com"

    def __init__(self, *, model: str = "claude-sonnet-4-5", api_key: Optional[str] = None,
                 base_url: Optional[str] = None, max_tokens: int = 1024, **kwargs: Any) -> None:
        super().__init__(model=model, api_key=api_key, base_url=base_url, **kwargs)
        self.max_tokens = max_tokens

    def _body(self, messages: List[BaseMessage], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        system, turns = _anthropic_messages(messages)
        body: Dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "messages": turns, "stream": True}
        if system:
            body["system"] = system
        if self.tools:
            body["tools"] = [{"name": t["name"], "description": t["description"],
                              "input_schema": t["parameters"]} for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = choice if isinstance(choice, dict) else \
                {"type": {"required": "any"}.get(choice, choice)} if choice in ("auto", "any", "none", "required") \
                else {"type": "tool", "name": choice}
        body.update((("stop_sequences" if k == "stop" else k), v) for k, v in kwargs.items())
        return body

    def _headers(self) -> Dict[str, str]:
        if not self.api_key:
            raise ValueError("ChatAnthropic needs an API key: set ANTHROPIC_API_KEY or pass api_key=...")
        return {"x-api-key": self.api_key, "anthropic-version": "2023-06-01",
                "Accept": "text/event-stream"}


# ==============================================================================================
# 14. Server-sent events out: streaming a run to a browser
#
# `to_sse` turns what `stream_events`, `astream_events` or `stream` yields into the bytes of a
# `text/event-stream` response; `read_sse` reads them back with the decoder of section 13.
# ==============================================================================================

def _jsonable(value: Any) -> Any:
    """A JSON-friendly form of what runs produce: messages, documents, prompt values, errors."""
    if isinstance(value, BaseMessage):
        out: Dict[str, Any] = {"type": type(value).__name__}
        out.update({f: getattr(value, f) for f in value._fields if getattr(value, f) or f == "content"})
        return _jsonable(out)
    if isinstance(value, Document):
        return {"type": "Document", "page_content": value.page_content,
                "metadata": _jsonable(value.metadata)}
    if isinstance(value, StringPromptValue):
        return {"type": "StringPromptValue", "text": value.text}
    if isinstance(value, ChatPromptValue):
        return {"type": "ChatPromptValue", "messages": _jsonable(value.messages)}
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return None  # NaN and infinities are not JSON: null, as LangServe's encoder writes them
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _sse(event: str, data: Any) -> bytes:
    """One SSE frame. `event` is one of ours (never text from a run), and the data is one line
    of JSON that `JSON.parse` accepts: a lone surrogate is written as its `\\u` escape."""
    text = json.dumps(_jsonable(data), ensure_ascii=False)
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return f"event: {event}\ndata: {text}\n\n".encode()


_RUN_EVENT = re.compile(r"on_[a-z_]+")  # a kind of run event: letters and underscores only


def _sse_frame(item: Any) -> bytes:
    """A run event becomes a frame named after its kind; anything else, even a dict that looks
    like an event (a model can write one), is a `data` frame."""
    if isinstance(item, dict) and "run_id" in item and "data" in item and \
            isinstance(item.get("event"), str) and _RUN_EVENT.fullmatch(item["event"]):
        return _sse(item["event"], item)
    return _sse("data", item)


def to_sse(items: Iterable[Any]) -> Iterator[bytes]:
    r"""`text/event-stream` bytes for an event stream (or a stream of chunks): one SSE event per
    item, named after the event kind (`on_chat_model_stream`...; `data` for plain chunks),
    its JSON as `data:`; then `event: end`, or `event: error` if the run fails. Closing this
    iterator closes `items`, which stops the run.

    >>> chunks = GenericFakeChatModel(messages=iter(["hi there"])).stream("x")
    >>> b"".join(to_sse(StrOutputParser().transform(chunks))).decode()
    'event: data\ndata: "hi"\n\nevent: data\ndata: " "\n\nevent: data\ndata: "there"\n\nevent: end\ndata: null\n\n'
    """
    iterator = iter(items)
    try:
        for item in iterator:
            yield _sse_frame(item)
    except Exception as exc:
        yield _sse("error", exc)
        return
    finally:
        _close(iterator)
    yield _sse("end", None)


async def ato_sse(items: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """Async twin of `to_sse`, for `astream_events` and `astream`.

    >>> async def main():
    ...     events = RunnableLambda(str.upper).astream_events("hi", include_types=["chain"])
    ...     return [read for read in read_sse([b"".join([b async for b in ato_sse(events)])])]
    >>> [(name, data["data"] if data else data) for name, data in asyncio.run(main())]
    [('on_chain_start', {'input': 'hi'}), ('on_chain_stream', {'chunk': 'HI'}), ('on_chain_end', {'output': 'HI'}), ('end', None)]
    """
    try:
        async for item in items:
            yield _sse_frame(item)
    except Exception as exc:
        yield _sse("error", exc)
        return
    finally:
        await _aclose(items)
    yield _sse("end", None)


def read_sse(chunks: Iterable[bytes]) -> Iterator[Tuple[str, Any]]:
    r"""`(event, data)` pairs, data parsed from JSON, from `text/event-stream` bytes (as they
    arrive, in pieces of any size): the client side of `to_sse`.

    >>> list(read_sse([b'event: data\ndata: "a"\n\nevent: e', b'nd\ndata: null\n\n']))
    [('data', 'a'), ('end', None)]
    """
    decoder = _SSEDecoder()
    for chunk in chunks:
        for event, data in decoder.feed(chunk):
            yield event, json.loads(data)
    for event, data in decoder.finish():
        yield event, json.loads(data)


# ==============================================================================================
# 15. Remote runnables: LangServe's protocol, from both ends
#
# A chain served by LangServe answers `POST {path}/invoke`, `/batch`, `/stream`,
# `/stream_events` and `/stream_log` with JSON bodies and server-sent events. `RemoteRunnable`
# calls such a server with the model servers' HTTP and SSE code; `asgi_app` is such a server,
# an ASGI 3 application with no framework. Values cross the wire as LangServe writes them:
# messages, documents and prompt values are dicts with a `"type"` naming the class.
# ==============================================================================================

def _dump(value: Any) -> Any:
    """A value as LangServe's JSON has it: every field of a message (with `"type"`: `human`,
    `ai`, `AIMessageChunk` ...), documents, prompt values; NaN and infinities as null.

    >>> _dump([HumanMessage("hi"), Document("d", id="1")])
    [{'content': 'hi', 'additional_kwargs': {}, 'response_metadata': {}, 'type': 'human', 'name': None, 'id': None}, {'id': '1', 'metadata': {}, 'page_content': 'd', 'type': 'Document'}]
    """
    if isinstance(value, BaseMessage):
        fields = [_dump(getattr(value, f)) for f in value._fields]
        out = dict(zip(value._fields[:3], fields[:3]))
        out["type"] = _wire_type(type(value))
        out.update(zip(value._fields[3:], fields[3:]))
        return out
    if isinstance(value, Document):
        return {"id": value.id, "metadata": _dump(value.metadata),
                "page_content": value.page_content, "type": "Document"}
    if isinstance(value, StringPromptValue):
        return {"text": value.text, "type": "StringPromptValue"}
    if isinstance(value, ChatPromptValue):
        return {"messages": _dump(value.messages)}  # no type, as LangServe sends it
    if isinstance(value, dict):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _wire_type(cls: type) -> str:
    """A message class's `"type"` on the wire: `human`, `ai`... ; a chunk class's own name."""
    return cls.__name__ if cls.__name__.endswith("Chunk") else cast(str, getattr(cls, "type"))


def _load(value: Any) -> Any:
    """The objects in LangServe's JSON, bottom-up: a dict whose `"type"` names a message,
    `Document`, `StringPromptValue` or `ChatPromptValueConcrete` becomes one (fields it does
    not know are left out); any other dict stays a dict.

    >>> _load({"a": [{"type": "human", "content": "hi", "id": None}], "b": {"type": "unknown"}})
    {'a': [HumanMessage(content='hi')], 'b': {'type': 'unknown'}}
    """
    if isinstance(value, list):
        return [_load(v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: _load(v) for k, v in value.items()}
    kind = value.get("type")
    if not isinstance(kind, str):
        return value
    cls = next((c for c in _subclasses(BaseMessage) if _wire_type(c) == kind), None)
    if cls is not None and "content" in value:
        fields = cast(Any, cls)._fields
        return cls(**{k: v for k, v in value.items() if k in fields and v is not None})
    if kind == "Document" and isinstance(value.get("page_content"), str):
        return Document(value["page_content"], metadata=value.get("metadata") or {},
                        id=value.get("id"))
    if kind == "StringPromptValue" and isinstance(value.get("text"), str):
        return StringPromptValue(value["text"])
    if kind == "ChatPromptValueConcrete" and isinstance(value.get("messages"), list):
        return ChatPromptValue(value["messages"])
    return value


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _compact(value: Any) -> str:
    """Compact JSON, as LangServe's orjson writes it; a lone surrogate as its `\\u` escape."""
    text = json.dumps(_dump(value), ensure_ascii=False, separators=(",", ":"))
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _LangServeStream:
    """A LangServe event stream -> the values of its `data` events, until `end`; an `error`
    event raises, and so does a stream that stops without `end` (nothing is truncated)."""

    def __init__(self, provider: str) -> None:
        self.provider, self.done = provider, False

    def frame(self, event: str, data: str) -> List[Any]:
        if event == "data":
            try:
                return [_load(json.loads(data))]
            except (ValueError, TypeError, RecursionError) as exc:  # not JSON, a bad message
                raise APIError(f"malformed event data {_short(data, 200)}: {exc!r}",
                               provider=self.provider) from None
        if event == "error":
            try:
                payload = json.loads(data)
            except ValueError:
                payload = None
            payload = payload if isinstance(payload, dict) else {"message": data}
            status = payload.get("status_code")
            raise APIError(str(payload.get("message", data)), body=payload, provider=self.provider,
                           status=status if isinstance(status, int) else None, reported=True)
        self.done = event == "end"
        return []  # `metadata`, and events LangServe may add

    def finish(self) -> None:
        if not self.done:  # deviation: LangServe's client returns the chunks so far, silently
            raise IncompleteStreamError("the stream ended without its `end` event; the answer "
                                        "so far would be truncated", provider=self.provider)


class RemoteRunnable(Runnable[Any, Any]):
    """A runnable served elsewhere, by LangServe or by `asgi_app`, called over HTTP.

    `invoke` posts to `{url}/invoke`, `batch` to `/batch`, `stream` reads `/stream`,
    `astream_events`/`stream_events` give the server's own events (`/stream_events`), and
    `astream_log` its log (`/stream_log`); sync and async. Messages and documents come back
    as objects. In a chain it is one step, a run named `RemoteRunnable` with no stream
    events (as LangServe's client shows it), whose chunks flow on as they arrive. An HTTP
    error, an `error` event, a cut stream or a timeout raises from the `APIError` family;
    leaving a stream closes the connection, which stops the remote run. `timeout` is
    seconds, or `(connect, read)`; `max_retries` retries refused connections and 5xx answers
    (none by default: a remote chain may have effects).

    >>> RemoteRunnable("http://localhost:8000/joke/")
    RemoteRunnable('http://localhost:8000/joke')
    """

    input_in_start = True
    _passes_through = True  # its chunks flow on as they come, with no stream events

    def __init__(self, url: str, *, timeout: Union[None, float, Tuple[float, float]] = None,
                 headers: Optional[Mapping[str, str]] = None, max_retries: int = 0,
                 max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.url, self.headers = url.rstrip("/"), dict(headers or {})
        self.timeout = _timeouts(timeout)
        self.max_retries, self.max_event_bytes = max_retries, max_event_bytes
        self._request("invoke", {})  # a bad URL or header fails here, not at the first call

    def _provider(self) -> str:
        return f"the server at {self.url}"

    def _streams(self, invoked: bool) -> bool:
        return False

    def _event_input(self, value: Any, end: bool) -> Any:
        return _dump(value)

    def _check_kwargs(self, kwargs: Dict[str, Any]) -> None:
        if kwargs:
            raise TypeError(f"RemoteRunnable takes no call-time keyword arguments (LangServe's "
                            f"protocol has no place for them), got {sorted(kwargs)}")

    def _request(self, endpoint: str, body: Dict[str, Any]) -> _Request:
        streams = endpoint.startswith("stream")
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"} if streams else {}
        return _Request(f"{self.url}/{endpoint}", {**headers, **self.headers}, body, self.timeout,
                        self.max_retries, self._provider())

    @staticmethod
    def _config(config: RunnableConfig) -> Dict[str, Any]:
        """What of a config goes to the server (which keeps only `configurable` by default)."""
        return {"tags": list(config.get("tags", ())), "metadata": _dump(config.get("metadata", {})),
                "recursion_limit": config.get("recursion_limit", 25),
                "configurable": _dump(config.get("configurable", {}))}

    def _body(self, value: Any, config: RunnableConfig, **extra: Any) -> Dict[str, Any]:
        return {"input": _dump(value), "config": self._config(config), "kwargs": {}, **extra}

    def _output(self, data: bytes, count: Optional[int] = None) -> Any:
        """The decoded `output` of an invoke (or, with `count`, a batch) answer."""
        # deviation: a bad answer is an APIError (LangServe's client lets json's errors out)
        try:
            output = json.loads(data)["output"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise APIError(f"the answer is not LangServe's {{\"output\": ...}} JSON: "
                           f"{_short(data, 200)}", provider=self._provider()) from None
        if count is not None and not (isinstance(output, list) and len(output) == count):
            raise APIError(f"the batch answer holds {_short(output, 60)}, not a list of {count} "
                           "outputs", provider=self._provider())
        try:
            return _load(output)
        except (ValueError, TypeError, RecursionError) as exc:
            raise APIError(f"the answer holds a malformed value: {exc!r}",
                           provider=self._provider()) from None

    def _capped(self, body: Iterable[bytes]) -> bytes:
        """A JSON answer's bytes, read no further than `max_event_bytes` (as a stream's events)."""
        parts, size = [], 0
        for data in body:
            size += len(data)
            if size > self.max_event_bytes:
                _close(body)
                raise _too_large(self.max_event_bytes, self._provider())
            parts.append(data)
        return b"".join(parts)

    async def _acapped(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`body` until it passes `max_event_bytes` (`_capped` raises then)."""
        size = 0
        try:
            async for data in body:
                yield data
                size += len(data)
                if size > self.max_event_bytes:
                    return
        finally:
            await _aclose(body)

    def _batch_body(self, inputs: List[Any], config: Any) -> Dict[str, Any]:
        return {"inputs": _dump(inputs), "kwargs": {},
                "config": [self._config(c) for c in _batch_configs(config, len(inputs))]}

    # -- invoke and batch: one JSON answer each ------------------------------------------------

    def _invoke_transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        request = self._request("invoke", self._body(_fold(inputs), config))
        yield self._output(self._capped(_post_stream(request)))

    async def _ainvoke_transform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        request = self._request("invoke", self._body(await _afold(inputs), config))
        yield self._output(self._capped([data async for data in self._acapped(_apost_stream(request))]))

    def batch(self, inputs: List[Any], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> List[Any]:
        """One `POST {url}/batch` for all the inputs (with `return_exceptions`, one invoke
        each, so that one failure does not take the others with it)."""
        _check_inputs("batch", inputs)
        if return_exceptions or not inputs:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        request = self._request("batch", self._batch_body(inputs, config))
        return cast(List[Any], self._output(self._capped(_post_stream(request)), len(inputs)))

    async def abatch(self, inputs: List[Any], config: Union[RunnableConfig, List[RunnableConfig], None] = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> List[Any]:
        """Async twin of `batch`."""
        _check_inputs("abatch", inputs)
        if return_exceptions or not inputs:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        request = self._request("batch", self._batch_body(inputs, config))
        body = [data async for data in self._acapped(_apost_stream(request))]
        return cast(List[Any], self._output(self._capped(body), len(inputs)))

    # -- streams: server-sent events -----------------------------------------------------------

    def _read(self, endpoint: str, body: Dict[str, Any]) -> Iterator[Any]:
        request = self._request(endpoint, body)
        return _read_frames(_post_stream(request), _SSEDecoder(self.max_event_bytes, self._provider(), True),
                            _LangServeStream(self._provider()))

    def _aread(self, endpoint: str, body: Dict[str, Any]) -> AsyncIterator[Any]:
        request = self._request(endpoint, body)
        return _aread_frames(_apost_stream(request), _SSEDecoder(self.max_event_bytes, self._provider(), True),
                             _LangServeStream(self._provider()))

    def _transform(self, inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        yield from self._read("stream", self._body(_fold(inputs), config))

    async def _atransform(self, inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        chunks = self._aread("stream", self._body(await _afold(inputs), config))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await _aclose(chunks)

    def _filtered(self, input: Any, config: Optional[RunnableConfig], kwargs: Dict[str, Any],
                  **filters: Any) -> Dict[str, Any]:
        """The body of a `/stream_events` or `/stream_log` request: the filters go along."""
        self._check_kwargs(kwargs)
        return self._body(input, _resolve(config), **{
            k: list(v) if isinstance(v, (list, tuple, set)) else v for k, v in filters.items()})

    def astream_events(self, input: Any, config: Optional[RunnableConfig] = None, *,
                       version: str = "v2", include_names: Optional[Sequence[str]] = None,
                       include_types: Optional[Sequence[str]] = None,
                       include_tags: Optional[Sequence[str]] = None,
                       exclude_names: Optional[Sequence[str]] = None,
                       exclude_types: Optional[Sequence[str]] = None,
                       exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> AsyncIterator[Event]:
        """The server's own events, as its `astream_events` makes them (filtered there): its
        run ids, the root named after its path, data decoded. (`version` is the server's.)"""
        return self._aread("stream_events", self._filtered(
            input, config, kwargs, include_names=include_names, include_types=include_types,
            include_tags=include_tags, exclude_names=exclude_names, exclude_types=exclude_types,
            exclude_tags=exclude_tags))

    def stream_events(self, input: Any, config: Optional[RunnableConfig] = None, *,
                      version: str = "v2", include_names: Optional[Sequence[str]] = None,
                      include_types: Optional[Sequence[str]] = None,
                      include_tags: Optional[Sequence[str]] = None,
                      exclude_names: Optional[Sequence[str]] = None,
                      exclude_types: Optional[Sequence[str]] = None,
                      exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> Iterator[Event]:
        """The events `astream_events` gives, synchronously."""
        return self._read("stream_events", self._filtered(
            input, config, kwargs, include_names=include_names, include_types=include_types,
            include_tags=include_tags, exclude_names=exclude_names, exclude_types=exclude_types,
            exclude_tags=exclude_tags))

    async def astream_log(self, input: Any, config: Optional[RunnableConfig] = None, *,
                          diff: bool = True, with_streamed_output_list: bool = True,
                          include_names: Optional[Sequence[str]] = None,
                          include_types: Optional[Sequence[str]] = None,
                          include_tags: Optional[Sequence[str]] = None,
                          exclude_names: Optional[Sequence[str]] = None,
                          exclude_types: Optional[Sequence[str]] = None,
                          exclude_tags: Optional[Sequence[str]] = None, **kwargs: Any) -> AsyncIterator[Any]:
        """The server's run log (`/stream_log`) as `RunLogPatch`es (`RunLog`s with `diff=False`)."""
        body = self._filtered(input, config, kwargs, include_names=include_names,
                              include_types=include_types, include_tags=include_tags,
                              exclude_names=exclude_names, exclude_types=exclude_types,
                              exclude_tags=exclude_tags, diff=True)
        log: Optional[RunLog] = None
        patches = self._aread("stream_log", body)
        try:
            async for data in patches:
                ops = data.get("ops") if isinstance(data, dict) else None
                if not (isinstance(ops, list) and all(isinstance(op, dict) and "path" in op for op in ops)):
                    raise APIError(f"a stream_log event is not {{\"ops\": [...]}}: {_short(data, 200)}",
                                   provider=self._provider())
                patch = RunLogPatch(*ops)
                if diff:
                    yield patch
                    continue
                try:
                    log = RunLog(*patch.ops, state=_apply_ops(None, _copy_ops(patch.ops))) \
                        if log is None else log + patch
                except (LookupError, TypeError, ValueError) as exc:
                    raise APIError(f"a stream_log op does not apply to the log: {exc!r}",
                                   provider=self._provider()) from None
                yield log
        finally:
            await _aclose(patches)

    def __repr__(self) -> str:
        return f"RemoteRunnable({self.url!r})"


MAX_BODY_BYTES = 2 ** 20  # the largest request body `asgi_app` reads by default (LangServe has no cap)
_ENDPOINTS = ("invoke", "batch", "stream", "stream_events", "stream_log")
_FILTERS = ("include_names", "include_types", "include_tags", "exclude_names", "exclude_types",
            "exclude_tags")


class _BadRequest(Exception):
    """A request `asgi_app` refuses: the status and the JSON `detail` to answer with."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def asgi_app(routes: Mapping[str, Any], *, max_body_bytes: int = MAX_BODY_BYTES) -> Callable[..., Awaitable[None]]:
    """An ASGI 3 application serving each runnable with LangServe's endpoints and wire format:
    `POST {path}/invoke`, `/batch`, `/stream`, `/stream_events`, `/stream_log`. Run it under
    any ASGI server (`uvicorn module:app`); it keeps no state between requests, so it scales
    across processes. As LangServe: the root run is named after the path, the server keeps
    only `configurable` of the client's config, a bad request gets 422/404/405 with a JSON
    `detail`, a failing run 500 (`Internal Server Error`, the exception stays on the server)
    or an `error` event once streaming. A body over `max_body_bytes` gets 413 (LangServe has
    no limit). A client that disconnects stops its run.

    >>> app = asgi_app({"/upper": RunnableLambda(str.upper)})
    >>> async def call(path, body):
    ...     sent = []
    ...     async def receive():
    ...         return {"type": "http.request", "body": body, "more_body": False}
    ...     async def send(message):
    ...         sent.append(message)
    ...     await app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
    ...     return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    >>> status, body = asyncio.run(call("/upper/invoke", b'{"input": "hi"}'))
    >>> status, json.loads(body)["output"]
    (200, 'HI')
    """
    table: Dict[str, Runnable[Any, Any]] = {}
    for path, runnable in routes.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"asgi_app route {path!r} must be a path starting with '/', "
                             "e.g. {'/joke': chain}")
        table[path.rstrip("/")] = coerce_to_runnable(runnable)

    async def app(scope: Dict[str, Any], receive: Callable[[], Awaitable[Dict[str, Any]]],
                  send: Callable[[Dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] in ("lifespan.startup", "lifespan.shutdown"):
                    await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        started = False

        async def respond(message: Dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)
        try:
            await serve(scope, receive, respond)
        except Exception:  # a bug of ours or the run's: a 500, never a traceback to the client
            if not started:
                await _send_text(respond, 500, b"Internal Server Error")

    async def serve(scope: Dict[str, Any], receive: Callable[[], Awaitable[Dict[str, Any]]],
                    send: Callable[[Dict[str, Any]], Awaitable[None]]) -> None:
        path, _, endpoint = scope["path"].rpartition("/")
        runnable = table.get(path)
        try:
            if runnable is None or endpoint not in _ENDPOINTS:
                raise _BadRequest(404, "Not Found")
            if scope["method"] != "POST":
                raise _BadRequest(405, "Method Not Allowed")
            request = await _request_json(receive, max_body_bytes)
            if request is None:
                return  # the client left
            headers = dict(scope.get("headers") or [])
            config = _served_config(request, endpoint, path, headers.get(b"user-agent", b""))
        except _BadRequest as exc:
            extra = [(b"allow", b"POST")] if exc.status == 405 else []
            await _send_json(send, exc.status, {"detail": exc.detail}, extra)
            return
        if endpoint in ("invoke", "batch"):
            work = _serve_json(runnable, endpoint, request, config, send)
        else:
            work = _serve_stream(runnable, endpoint, request, config, send)
        await _unless_disconnected(work, receive)
    return app


async def _unless_disconnected(work: Awaitable[None], receive: Callable[[], Awaitable[Dict[str, Any]]]) -> None:
    """Do `work`, but cancel it (which stops the run) if the client disconnects first."""
    async def disconnected() -> None:
        if (await receive())["type"] != "http.disconnect":  # ASGI: nothing else comes now
            await asyncio.get_running_loop().create_future()  # a server that says otherwise: no watch
    working, watching = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        try:
            await working
        except asyncio.CancelledError:
            pass


async def _request_json(receive: Callable[[], Awaitable[Dict[str, Any]]], limit: int) -> Any:
    """The request body as JSON (None if the client left first)."""
    body: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body.append(message.get("body", b""))
        size += len(body[-1])
        if size > limit:  # deviation: LangServe reads a body of any size
            raise _BadRequest(413, f"the request body is over {limit} bytes")
        if not message.get("more_body"):
            break
    try:
        request = json.loads(b"".join(body))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's stack
        raise _BadRequest(422, ["Invalid JSON body"]) from None
    if not isinstance(request, dict):
        raise _BadRequest(422, [{"type": "model_type", "loc": [], "msg": "Input should be a "
                                 "valid dictionary or object to extract fields from"}])
    for key in ("input", "inputs"):
        try:
            if key in request:
                request[key] = _load(request[key])  # messages, documents: objects
        except (ValueError, TypeError, RecursionError) as exc:  # a message that cannot be one
            raise _BadRequest(422, [{"type": "value_error", "loc": [key], "msg": str(exc)}]) from None
    for name in _FILTERS:
        value = request.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _BadRequest(422, [{"type": "list_type", "loc": [name],
                                     "msg": "Input should be a valid list of strings"}])
    return request


def _served_config(request: Dict[str, Any], endpoint: str, path: str, agent: bytes) -> Any:
    """The config (or configs, for batch) a request runs with: of the client's, only
    `configurable` is kept, as LangServe does; the server names the run after the path."""
    key = "inputs" if endpoint == "batch" else "input"
    if key not in request:
        raise _BadRequest(422, [{"type": "missing", "loc": [key], "msg": "Field required"}])
    if endpoint == "batch" and not isinstance(request["inputs"], list):
        raise _BadRequest(422, [{"type": "list_type", "loc": ["inputs"], "msg": "Input should be a valid list"}])
    given = request.get("config", {})
    given = {} if given is None else given
    many = endpoint == "batch" and isinstance(given, list)
    for config in given if many else [given]:
        if not isinstance(config, dict) or not isinstance(config.get("configurable", {}), dict):
            raise _BadRequest(422, [{"type": "dict_type", "loc": ["config"],
                                     "msg": "Input should be a valid dictionary"}])
    if many and len(given) != len(request["inputs"]):
        raise _BadRequest(422, f"Number of configs ({len(given)}) must match number of inputs "
                               f"({len(request['inputs'])})")

    def served(config: Dict[str, Any]) -> RunnableConfig:
        try:
            configurable = _load(config.get("configurable", {}))
        except (ValueError, TypeError, RecursionError) as exc:
            raise _BadRequest(422, [{"type": "value_error", "loc": ["config", "configurable"],
                                     "msg": str(exc)}]) from None
        return {"run_name": path, "configurable": configurable,
                "metadata": {"__useragent": agent.decode("latin-1"), "__langserve_endpoint": endpoint}}
    return [served(c) for c in given] if many else served(given)


async def _send_json(send: Callable[[Dict[str, Any]], Awaitable[None]], status: int, value: Any,
                     headers: Sequence[Tuple[bytes, bytes]] = ()) -> None:
    body = _compact(value).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


async def _send_text(send: Callable[[Dict[str, Any]], Awaitable[None]], status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _serve_json(runnable: Runnable[Any, Any], endpoint: str, request: Dict[str, Any],
                      config: Any, send: Callable[[Dict[str, Any]], Awaitable[None]]) -> None:
    import uuid
    try:
        if endpoint == "invoke":
            config["run_id"] = str(uuid.uuid4())
            output = await runnable.ainvoke(request["input"], config)
            metadata: Dict[str, Any] = {"run_id": config["run_id"], "feedback_tokens": []}
        else:
            inputs = request["inputs"]
            configs = config if isinstance(config, list) else [dict(config) for _ in inputs]
            for c in configs:
                c["run_id"] = str(uuid.uuid4())
            output = await runnable.abatch(inputs, configs)
            metadata = {"responses": [{"run_id": c["run_id"], "feedback_tokens": []} for c in configs],
                        "run_ids": [c["run_id"] for c in configs]}
    except Exception as exc:
        # deviation: LangServe finds a missing variable from the input's schema (pydantic's 422)
        if isinstance(exc, _MissingVariables):
            await _send_json(send, 422, {"detail": str(exc.args[0] if exc.args else exc)})
            return
        await _send_text(send, 500, b"Internal Server Error")
        return
    await _send_json(send, 200, {"output": output, "metadata": metadata})


async def _serve_stream(runnable: Runnable[Any, Any], endpoint: str, request: Dict[str, Any],
                        config: RunnableConfig, send: Callable[[Dict[str, Any]], Awaitable[None]]) -> None:
    """An event stream, frame by frame as the run makes them."""
    import uuid
    value = request["input"]
    filters = {k: request[k] for k in _FILTERS if request.get(k) is not None}
    if endpoint == "stream":
        config["run_id"] = str(uuid.uuid4())
        items: AsyncIterator[Any] = runnable.astream(value, config)
    elif endpoint == "stream_events":
        items = runnable.astream_events(value, config, **filters)
    else:
        items = runnable.astream_log(value, config, diff=True, **filters)

    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no")]})
    first = True
    try:
        async for item in items:
            if endpoint == "stream" and first:
                frame = f'event: metadata\r\ndata: {json.dumps({"run_id": config["run_id"]})}\r\n\r\n'
                await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
            first = False
            if endpoint == "stream_events":  # LangServe strips its own `__` metadata
                item = {**item, "metadata": {k: v for k, v in item["metadata"].items()
                                             if not k.startswith("__")}}
            elif endpoint == "stream_log":
                item = {"ops": item.ops}
            frame = f"event: data\r\ndata: {_compact(item)}\r\n\r\n"
            await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
        ending = b"event: end\r\n\r\n"
    except Exception:  # the error text stays on the server, as LangServe keeps it
        ending = b'event: error\r\ndata: {"status_code": 500, "message": "Internal Server Error"}\r\n\r\n'
    finally:
        await _aclose(items)
    await send({"type": "http.response.body", "body": ending, "more_body": False})


# ==============================================================================================
# 16. Demo: `python -m minichain`
# ==============================================================================================

def demo_model() -> BaseChatModel:
    """The model the environment names: an OpenAI-compatible server (`OPENAI_BASE_URL` or
    `OPENAI_API_KEY`, model `OPENAI_MODEL`), Ollama (`OLLAMA_HOST`, model `OLLAMA_MODEL`),
    Anthropic (`ANTHROPIC_API_KEY`, model `ANTHROPIC_MODEL`), else the fake model.

    >>> type(demo_model()).__name__ if not any(k in os.environ for k in (
    ...     "OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_HOST", "ANTHROPIC_API_KEY")) else "GenericFakeChatModel"
    'GenericFakeChatModel'
    """
    env = os.environ
    if env.get("OPENAI_BASE_URL") or env.get("OPENAI_API_KEY"):
        return ChatOpenAI(model=env.get("OPENAI_MODEL", "gpt-4o-mini"))
    if env.get("OLLAMA_HOST"):
        return ChatOllama(model=env.get("OLLAMA_MODEL", "llama3.2"))
    if env.get("ANTHROPIC_API_KEY"):
        return ChatAnthropic(model=env.get("ANTHROPIC_MODEL", "claude-sonnet-4-5"))
    return GenericFakeChatModel(messages=iter([
        "Why don't parrots ever get lost? Because they always follow the flock's directions!"]),
        sleep=0.05)


def _demo() -> None:
    """Stream a joke, token by token, from the model the environment names (or the fake)."""
    import sys
    model = demo_model()
    print(f"[{model!r}]", file=sys.stderr)
    prompt = ChatPromptTemplate.from_template("tell me a joke about {topic}")
    for chunk in (prompt | model | StrOutputParser()).stream({"topic": "parrot"}):
        print(chunk, end="|", flush=True)
    print()


# ==============================================================================================
# Appendix A. The incremental JSON parser
#
# `_JsonStream` is what section 8's `JsonOutputParser` and `parse_partial_json` run on: a push
# machine that reads each character a bounded number of times and shows the same partial values
# as langchain_core's parser, which re-parses the whole text at every chunk. It is long (strings
# with escapes and surrogates, numbers past Python's digit limit, ```json fences, JSON-patch
# diffs within a budget), and a reader of the streaming core can skip it.
# ==============================================================================================

_WS = " \t\n\r"
_STRIP = " \t\n\r`"  # langchain_core strips Unicode whitespace, then these, from the text
# a segment up to its last character that may not be stripped (linear: a search for the
# stripped run at the end would try every start in a long run of spaces)
_LAST_SHOWN = re.compile(r".*[^\s`]", re.S)
_LAST_OTHER_SPACE = re.compile(r".*[^\S \t\n\r]", re.S)  # up to the last whitespace not in _STRIP
_SKIPPED = re.compile(r"[\s`]+")  # what is skipped before the value (and kept to find a fence)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(r"[0-9+\-.eE]*")
_NUMBER_SHOWN = 4300  # a longer number shows no new value until it ends (see `_number`)
_STRING_STOP = re.compile(r'["\\]')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = {"true": True, "false": False, "null": None}
_DIFF_FREE, _DIFF_RATIO = 1 << 16, 16  # the ops' budget in diff mode (see `diff_due`)


class _Open:
    """An open container on the parse stack, and (in diff mode) what the last diff showed of it.

    Containers are built in place, so one that closes is the same object in its parent; a
    finished member is never changed again. Only the last member of an open container grows.
    """

    __slots__ = ("value", "key", "seg", "end", "shown", "done", "last_key", "repeat")

    def __init__(self, value: Any, seg: str) -> None:
        self.value = value  # the dict or list, holding the finished members
        self.key: Optional[str] = None  # a dict's key whose value is in progress
        self.seg = seg  # its step in a JSON pointer: "/key" or "/index" ("" for the root)
        self.end = 0  # where its pointer ends in `_JsonStream.pointer`
        self.shown = -1  # members the last diff showed (-1: it was not open then)
        self.done = 0  # how many of those were finished
        self.last_key: Optional[str] = None  # a dict's last shown key
        self.repeat = False  # a dict's member in progress repeats a key (diff mode)


class _JsonStream:
    """An incremental JSON parser whose snapshots match langchain_core's partial parse.

    A push machine, as the decoders are: `feed(text)` returns what to stream for it (the new
    snapshot if the value changed; with `diff`, the JSON-patch ops since the last ones
    instead), `finish()` what is left at the end. Underneath, `read(text)` consumes text and
    says whether the value changed, and `snapshot()` is the partial value: open containers
    shown with what they hold so far, a string growing by prefix (trailing whitespace hidden
    until more text follows), a number as its longest valid prefix, and a member dropped while
    its key, literal or `\\u` escape is incomplete. With `markdown`, leading whitespace and
    backticks and a ```json fence are skipped.

    Each character is looked at a bounded number of times, and nothing is ever re-parsed or
    compared whole: the open containers are a stack, and between two snapshots only its top
    part can change (`low` is the shallowest level touched since the last diff). A snapshot
    copies the open containers (the path to what changed); finished values are shared.

    >>> p = _JsonStream()
    >>> [p.feed(t) for t in ['{"a', '": [1', '2, "x', ' ', '"]}']] + [p.finish()]
    [({},), ({'a': [1]},), ({'a': [12, 'x']},), (), ({'a': [12, 'x ']},), ()]
    """

    def __init__(self, markdown: bool = True, diff: bool = False) -> None:
        self.stack: List[_Open] = []  # the open containers, outermost first
        self.mode = "start" if markdown else "value"
        self.token = ""  # scalar in progress: "str", "key", "num", "lit" or ""
        self.pieces: List[str] = []  # a string's decoded text so far
        self._new_tail()  # a string's trailing whitespace/backticks, shown once more text follows
        self.escape = ""  # an escape sequence not yet complete
        self.raw = ""  # a number's or literal's text so far (a number's first _NUMBER_SHOWN)
        self.more: List[str] = []  # the rest of a number longer than that
        self.shown: Any = _MISSING  # a number's value as shown (its longest valid prefix)
        self.length = 0  # a string's length so far (without its tail)
        self.measure: Any = None  # what the scalar in progress showed after the last feed
        self.result: Any = _MISSING  # the whole value, once complete
        self.error = ""  # why the text is not JSON
        self.offset = 0  # characters consumed, for error positions
        self.preamble = ""  # what decides where a ```json fence starts (kept short)
        self.strip = markdown
        self.changed = False
        self.in_trailing_string = self.trailing_escape = self.stray_closer = False
        self.trailing_depth = 0
        # diff mode: what the last diff showed (see `diff`)
        self.diff_mode = diff
        self.diffed = False  # whether a diff was made yet
        self.low = 0  # the shallowest level changed since (-1: the root value itself)
        self.depth = 0  # how many containers were open
        self.scalar: Any = _MISSING  # the scalar in progress shown at the deepest level
        self.closed: List[_Open] = []  # containers shown then and closed since, deepest first
        self.pointer = ""  # the JSON pointer of the open containers' first `pointed` levels
        self.pointed = 0
        self.path_size = 0  # the length of the deepest open container's pointer
        self.spent = 0  # what the diffs so far cost (see `diff_due`)
        self.held = False  # whether a change waits for the next diff
        # an object repeated a key: that member changes in place, which the levels' diff does
        # not follow (members only ever append), so while such members are in progress
        # (`repeats`) and once after, a diff replaces the whole value
        self.repeats = 0
        self.rewritten = False

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, text: str) -> Tuple[Any, ...]:
        """Consume `text`; return what to stream for it: the new snapshot if the value changed
        (with `diff`, the ops since the last ones, once they are due), else nothing."""
        if not (self.read(text) or self.held) or not self.showing():
            return ()
        if not self.diff_mode:
            return (self.snapshot(),)
        # deviation: past a budget linear in the input, ops are held and sent with a later
        # chunk's (langchain_core diffs every chunk: quadratic for a long string or deep nesting)
        ops = self.diff() if self.diff_due() else None
        return (ops,) if ops else ()

    def finish(self) -> Tuple[Any, ...]:
        """The text has ended: what is left to stream (with `diff`, the ops still held)."""
        ops = self.diff() if self.held and self.showing() else None
        return (ops,) if ops else ()

    def read(self, text: str) -> bool:
        """Consume `text`; True if the value changed."""
        self.changed = False
        i = 0
        while i < len(text) and not self.error:
            if self.mode == "done":  # after the value: only watch for a stray closer
                i = self._trailing(text, i)
                break
            if self.token in ("str", "key"):
                i = self._string(text, i)
            elif self.token == "num":
                i = self._number(text, i)
            elif self.token == "lit":
                i = self._literal(text, i)
            elif self.mode == "start" and (text[i] == "`" or text[i].isspace()):
                m = _SKIPPED.match(text, i)
                self._keep_preamble(self.preamble + (m.group() if m else text[i]))
                i = m.end() if m else i + 1
            elif self.mode == "start" and text[i] in '{["-0123456789tfn':
                self.mode = "value"
            elif self.mode in ("start", "fence"):
                # not JSON: look for a ```json fence, as langchain_core does, and go on after it
                self.mode, self.preamble = "fence", self.preamble + text[i:]
                self.offset += i
                text, i = self._after_fence(), 0
            else:
                c = text[i]
                i += 1
                if c not in _WS:
                    self._structure(c)
        self.offset += i - 1 if self.error else i  # on an error: where it is
        measure = self._measure()
        if measure != self.measure:
            self.changed, self.measure = True, measure
        return self.changed

    def _trailing(self, text: str, i: int) -> int:
        """Text after the value is ignored, but a closer with no opener makes it invalid."""
        for c in text[i:]:
            if self.in_trailing_string:
                self.in_trailing_string = c != '"' or self.trailing_escape
                self.trailing_escape = c == "\\" and not self.trailing_escape
            elif c == '"':
                self.in_trailing_string = True
            elif c in "{[":
                self.trailing_depth += 1
            elif c in "}]":
                self.trailing_depth -= 1
                self.stray_closer = self.stray_closer or self.trailing_depth < 0
        return len(text)

    def _keep_preamble(self, skipped: str) -> None:
        """Keep of the whitespace and backticks skipped so far only what can still matter.
        langchain_core's fence search takes the first ```; what follows it is skipped again
        (and searched again) once the value does not start, so it alone is kept; with no ```,
        only the last two characters can still begin one. (Keeping it all made prose and
        whitespace quadratic: every chunk searched and copied everything before it.)"""
        while True:
            at = skipped.find("```")
            if at < 0:
                self.preamble = skipped[-2:]
                return
            if at + 3 == len(skipped):
                self.preamble = "```"
                return
            skipped = skipped[at + 3:]

    def _after_fence(self) -> str:
        """The text after a ```json fence in the preamble ("" while there is none yet)."""
        at = self.preamble.find("```")
        if at < 0:
            self.preamble = self.preamble[-2:]  # prose: only a ``` across chunks can matter
            return ""
        rest = self.preamble[at + 3:]
        if len(rest) < 4 and "json".startswith(rest):
            self.preamble = self.preamble[at:]
            return ""  # wait for more: this may still become ```json
        self.mode, self.preamble = "start", ""
        return rest[4:] if rest.startswith("json") else rest

    def _fail(self, why: str) -> None:
        self.error = why
        self.stack, self.token, self.mode = [], "", "dead"

    def _structure(self, c: str) -> None:
        mode, frame = self.mode, self.stack[-1] if self.stack else None
        if mode in ("value", "value_or_end") and c not in "]}":
            self._begin_value(c)
        elif c in "]}" and mode in ("after", "key_or_end", "value_or_end"):
            if frame is None or (c == "}") != isinstance(frame.value, dict):
                return self._fail(f"unexpected {c!r}")
            self.stack.pop()
            if self.diff_mode:
                self.pointed = min(self.pointed, len(self.stack))
                self.path_size -= len(frame.seg)
                if frame.shown >= 0:
                    self.closed.append(frame)
            self._complete(frame.value, changed=False)
        elif c == "," and mode == "after" and frame is not None:
            self.mode = "key" if isinstance(frame.value, dict) else "value"
        elif c == '"' and mode in ("key", "key_or_end"):
            self.token, self.pieces = "key", []
            self._new_tail()
        elif c == ":" and mode == "colon":
            self.mode = "value"
        else:
            self._fail(f"unexpected {c!r}")

    def _begin_value(self, c: str) -> None:
        self.low = min(self.low, len(self.stack) - 1)  # the value is a new member there
        if c == "{" or c == "[":  # an open container shows at once, empty
            seg = ""
            if self.diff_mode and self.stack:
                parent = self.stack[-1]
                at = parent.key if isinstance(parent.value, dict) else str(len(parent.value))
                seg = "/" + _escape(cast(str, at))
                self.path_size += len(seg)
            self.stack.append(_Open({} if c == "{" else [], seg))
            self.mode = "key_or_end" if c == "{" else "value_or_end"
            self.changed = True
            return
        self.measure = None  # a new scalar: nothing of it shown yet
        if c == '"':  # an open string shows as '' and grows by prefix
            self.token, self.pieces, self.length = "str", [], 0
            self._new_tail()
        elif c in "-0123456789":  # a number shows its longest valid prefix
            self.token, self.raw, self.more = "num", c, []
            self._show_number()
        elif c in "tfn":  # a literal shows once complete
            self.token, self.raw = "lit", c
        else:
            self._fail(f"unexpected {c!r} where a value should start")

    def _complete(self, value: Any, changed: bool) -> None:
        """A value is finished: store it in its container (or as the result)."""
        self.token, self.measure = "", None
        self.changed = self.changed or changed
        self.low = min(self.low, len(self.stack) - 1)
        if not self.stack:
            self.result, self.mode = value, "done"
            return
        frame = self.stack[-1]
        if isinstance(frame.value, dict):
            frame.value[frame.key] = value
            frame.key = None
            if frame.repeat:  # a repeated key's member is finished: one more whole diff
                frame.repeat, self.rewritten = False, True
                self.repeats -= 1
        else:
            frame.value.append(value)
        self.mode = "after"

    def _measure(self) -> Any:
        """What the scalar in progress shows, in a form cheap to compare (None: nothing)."""
        if self.token == "num":
            return None if self.shown is _MISSING else self.shown
        if self.token != "str" or self.escape.startswith("\\u"):
            return None
        if self.escape or not self.strip:  # the whole tail shows
            shown, last = self.tail_len, self.tail[-1][-1:] if self.tail else ""
        else:
            shown, last = self.tail_cut, self.tail_cut_char
        if not shown:
            last = self.pieces[-1][-1:] if self.pieces else ""
        return (self.length + shown, last)

    def _new_tail(self) -> None:
        self.tail: List[str] = []  # pieces of the run of whitespace/backticks the string ends with
        self.tail_len = 0
        # langchain_core strips Unicode whitespace, then " \t\n\r`": of the tail, what is left
        # ends at the last other whitespace (\xa0, \u2028...) that comes before a backtick
        self.tail_cut, self.tail_cut_char = 0, ""
        self.other_end, self.other_char = 0, ""  # the last such whitespace seen in the tail

    def _add_tail(self, run: str) -> None:
        """Add a run of whitespace and backticks to the tail, keeping where the strip cuts it
        (so that neither growing it nor measuring it reads it all again)."""
        tick = run.rfind("`")
        if tick >= 0:
            other = _LAST_OTHER_SPACE.match(run, 0, tick)
            if other:
                self.tail_cut, self.tail_cut_char = self.tail_len + other.end(), run[other.end() - 1]
            else:
                self.tail_cut, self.tail_cut_char = self.other_end, self.other_char
        other = _LAST_OTHER_SPACE.match(run)
        if other:
            self.other_end, self.other_char = self.tail_len + other.end(), run[other.end() - 1]
        self.tail.append(run)
        self.tail_len += len(run)

    def _take_tail(self) -> str:
        """The whole tail, which joins the string's text (more text came after it)."""
        tail = "".join(self.tail)
        self._new_tail()
        return tail

    def _shown_tail(self) -> str:
        """The part of a string's trailing whitespace that langchain_core's strip leaves."""
        tail = "".join(self.tail)
        if self.escape or not self.strip:
            return tail  # the text ends in a backslash: nothing is stripped
        return tail[:self.tail_cut]

    def _string(self, text: str, i: int) -> int:
        if self.escape:
            i = self._escape(text, i)
            if self.escape or self.error:
                return i
        while i < len(text):
            m = _STRING_STOP.search(text, i)
            end = m.start() if m else len(text)
            if end > i:
                segment = text[i:end]
                if self.strip:  # up to its last character that is not whitespace or a backtick
                    last = _LAST_SHOWN.match(segment)
                    shown = segment[:last.end()] if last else ""
                else:
                    shown = segment
                if shown:
                    tail = self._take_tail()
                    self.pieces.append(tail + shown)
                    self.length += len(tail) + len(shown)
                    if len(shown) < len(segment):
                        self._add_tail(segment[len(shown):])
                else:
                    self._add_tail(segment)
            if m is None:
                return len(text)
            i = end + 1
            if text[end] == '"':
                value = "".join(self.pieces) + self._take_tail()
                if self.token == "key":
                    self.token, self.mode = "", "colon"
                    self.stack[-1].key = value
                    if self.diff_mode and value in self.stack[-1].value:
                        self.stack[-1].repeat = True
                        self.repeats += 1
                else:
                    self._complete(value, changed=self.measure != (len(value), value[-1:]))
                return i
            self.escape = "\\"
            i = self._escape(text, i)
            if self.escape or self.error:
                return i
        return i

    def _escape(self, text: str, i: int) -> int:
        """Continue an escape sequence; complete ones join the string's text."""
        while i < len(text) and self.escape:
            self.escape += text[i]
            i += 1
            esc = self.escape
            if len(esc) == 2 and esc[1] != "u":
                if esc[1] not in _ESCAPES:
                    self._fail(f"invalid escape {esc!r} in a string")
                    return i
                self._commit(_ESCAPES[esc[1]])
            elif len(esc) == 6:
                try:
                    code = int(esc[2:], 16)
                except ValueError:
                    self._fail(f"invalid escape {esc!r} in a string")
                    return i
                self._commit(chr(code))
        return i

    def _commit(self, decoded: str) -> None:
        """Add an escaped character (joining a surrogate pair, as json.loads does)."""
        self.escape = ""
        if self.tail:
            tail = self._take_tail()
            self.pieces.append(tail)
            self.length += len(tail)
        last = self.pieces[-1] if self.pieces else ""
        if 0xDC00 <= ord(decoded) <= 0xDFFF and last and 0xD800 <= ord(last[-1]) <= 0xDBFF:
            pair = (last[-1] + decoded).encode("utf-16", "surrogatepass").decode("utf-16")
            self.pieces[-1] = last[:-1] + pair
        else:
            self.pieces.append(decoded)
            self.length += 1

    def _number(self, text: str, i: int) -> int:
        end = _NUMBER_CHARS.match(text, i).end()  # type: ignore[union-attr]  # `*` always matches
        if self.more or len(self.raw) + end - i > _NUMBER_SHOWN:
            # deviation: past 4,300 characters a number shows no new value until it ends (one
            # digit can still change it, so langchain_core re-reads it all at every chunk)
            self.more.append(text[i:end])
        else:
            self.raw += text[i:end]
            self._show_number()
        if end < len(text):  # the number ended
            self._end_number()
        return end

    def _end_number(self) -> None:
        raw = self.raw + "".join(self.more)
        if _NUMBER.fullmatch(raw) is None:
            return self._fail(f"invalid number {_short(raw)}")
        value = self._number_value(raw)
        self._complete(value, changed=self.measure is None or self.measure != value)

    @staticmethod
    def _number_value(text: str) -> Any:
        if any(c in text for c in ".eE"):
            return float(text)
        try:
            return int(text)
        except ValueError as exc:  # over Python's limit on digits (3.11+): not a JSON error
            # deviation: an OutputParserException (langchain_core lets int()'s ValueError out)
            raise OutputParserException(f"the JSON number {_short(text, 40)} is too long to "
                                        f"convert to an int: {exc}") from None

    def _show_number(self) -> None:
        m = _NUMBER.match(self.raw)
        self.shown = self._number_value(m.group()) if m and m.group() not in ("", "-") else _MISSING

    def _literal(self, text: str, i: int) -> int:
        while i < len(text) and self.token == "lit":
            self.raw += text[i]
            i += 1
            if self.raw in _LITERALS:
                self._complete(_LITERALS[self.raw], changed=True)
            elif not any(name.startswith(self.raw) for name in _LITERALS):
                if self.stack or not self.strip:
                    self._fail(f"invalid literal {self.raw!r}")
                else:  # prose, not a literal: a ```json fence may still follow
                    self.token, self.mode, self.preamble = "", "fence", self.raw
                    return i
        return i

    def end(self) -> None:
        """The text has ended: a number at the very end is complete (for a whole document)."""
        if self.token == "num" and _NUMBER.fullmatch(self.raw + "".join(self.more)):
            self._end_number()

    # -- reading -------------------------------------------------------------------------------

    def _scalar(self) -> Any:
        """The in-progress scalar as shown, or _MISSING where it is hidden."""
        if self.token == "str":
            if self.escape.startswith("\\u"):
                return _MISSING
            joined = "".join(self.pieces)
            self.pieces = [joined] if joined else []
            return joined + self._shown_tail()
        if self.token == "num":
            return self.shown
        return _MISSING

    def _scalar_shown(self) -> bool:
        """Whether a snapshot shows a scalar in progress (without building it)."""
        if self.token == "str":
            return not self.escape.startswith("\\u")
        return self.token == "num" and self.shown is not _MISSING

    def showing(self) -> bool:
        """Whether there is a snapshot to show (false before the value starts, or after an error)."""
        return self.result is not _MISSING or bool(self.stack) or self._scalar_shown()

    def snapshot(self, level: int = 0) -> Any:
        """The partial value now (`_MISSING` if nothing can be shown yet); with `level`, the
        part of it that starts at that depth of the open containers."""
        if self.result is not _MISSING:
            return self.result
        inner = self._scalar()
        for frame in reversed(self.stack[level:]):
            # deviation: only the open containers are copied: finished members are shared between
            # snapshots (langchain_core parses each snapshot afresh)
            copy: Any = dict(frame.value) if isinstance(frame.value, dict) else list(frame.value)
            if inner is not _MISSING:
                if isinstance(copy, dict):
                    if frame.key is not None:
                        copy[frame.key] = inner
                else:
                    copy.append(inner)
            inner = copy
        return inner

    # -- diff mode -----------------------------------------------------------------------------

    def diff_due(self) -> bool:
        """Whether to diff now, or hold the change for a later diff that will include it.

        Each op carries a whole growing string and a full path, so diffing after every chunk
        costs the square of the input for a long string arriving a character at a time, or a
        deep document a bracket at a time. Ops are held while what they would carry (the path
        and the string in progress) would take the total past `_DIFF_FREE` characters plus
        `_DIFF_RATIO` per character read: below that every change is sent, as langchain_core
        does; past it a change is sent once the input has grown by a sixteenth of its cost.
        """
        cost = self.path_size + (self.length if self.token == "str" else 0) + 1
        if self.rewritten or self.repeats:  # a whole value: at most what was read
            cost += self.offset
        if self.spent + cost > _DIFF_FREE + _DIFF_RATIO * self.offset:
            self.held = True
            return False
        self.spent += cost
        self.held = False
        return True

    def diff(self) -> List[Dict[str, Any]]:
        """JSON-patch ops from what the last diff showed to what a snapshot shows now, as
        jsonpatch makes them from two snapshots (langchain_core's diff mode), without making
        or comparing snapshots: only the levels changed since the last diff are visited.

        >>> p = _JsonStream(diff=True)
        >>> [(p.read(t), p.diff()) for t in ['{"a": [1', ', 2], "b": "x']][1][1]
        [{'op': 'add', 'path': '/b', 'value': 'x'}, {'op': 'add', 'path': '/a/1', 'value': 2}]
        """
        low = max(min(self.low, len(self.stack) - 1), 0)  # the levels above it are as shown
        # deviation: after a repeated key, a whole-value replace (jsonpatch replaces the member)
        if not self.diffed or self.rewritten or self.repeats:
            self.diffed, self.rewritten, low = True, False, 0
            ops = [{"op": "replace", "path": "", "value": self.snapshot()}]
        elif self.depth == 0:  # the root was a scalar
            value = self.result if self.result is not _MISSING else self._scalar()
            ops = [] if _same(self.scalar, value) else [{"op": "replace", "path": "", "value": value}]
        else:
            ops = self._level_ops(low)
        self._remember(low)
        return ops

    def _level_ops(self, level: int) -> List[Dict[str, Any]]:
        """The ops from `level` down: at each level, what was added after the members shown
        last time, and what became of the last of those (it may have grown, or been hidden)."""
        stack = self.stack
        frame = stack[level] if level < len(stack) else self.closed.pop()
        path = self._pointer(level) if level < len(stack) else ""
        # deviation: where several members change in one chunk, a list's ops may differ from the
        # ones jsonpatch picks (same result).
        # jsonpatch puts an object's own ops before its last member's, a list's after them:
        # `before` is in order, `after` reversed, and the deeper levels' ops go between
        before: List[Dict[str, Any]] = []
        after: List[Dict[str, Any]] = []
        while True:
            value, is_dict = frame.value, isinstance(frame.value, dict)
            is_open = level < len(stack) and stack[level] is frame
            done = len(value)
            growing = is_open and (level < len(stack) - 1 or self._scalar_shown())
            count = done + growing
            was_open = frame.shown > frame.done  # the last shown member was in progress
            last: Any = frame.last_key if is_dict else frame.shown - 1
            own: List[Dict[str, Any]] = []
            if was_open and count < frame.shown:  # hidden again (a partial \u escape)
                own.append({"op": "remove", "path": _member(path, last)})
            elif count > frame.shown:
                keys: Iterable[Any] = self._new_keys(frame, done - frame.shown) if is_dict \
                    else range(frame.shown, done)
                own += [{"op": "add", "path": _member(path, k), "value": value[k]} for k in keys]
                if growing and done >= frame.shown:  # the member in progress is new too
                    own.append({"op": "add", "path": _member(path, frame.key if is_dict else done),
                                "value": self.snapshot(level + 1)})
            if is_dict:
                before.extend(own)
            else:
                after.extend(reversed(own))
            if not was_open or count < frame.shown:
                break
            path = _member(path, last)
            if level + 1 < self.depth:  # the last member was an open container: go down
                level += 1
                child = stack[level] if level < len(stack) else None
                frame = child if child is not None and child.shown >= 0 else self.closed.pop()
                continue
            # the last member was the scalar in progress: it grew, or it ended
            now = value[last] if done >= frame.shown else self._scalar()
            if not _same(self.scalar, now):
                before.append({"op": "replace", "path": path, "value": now})
            break
        return before + after[::-1]

    @staticmethod
    def _new_keys(frame: _Open, n: int) -> List[str]:
        """The last `n` keys of a dict, in order (without looking at the others)."""
        keys: List[str] = []
        for key in reversed(frame.value):
            if len(keys) >= n:
                break
            keys.append(key)
        return keys[::-1]

    def _pointer(self, level: int) -> str:
        """The JSON pointer of the open container at `level`. The pointer of the outer levels
        is kept, so a deep document's pointer is built once, not once per diff."""
        if level >= self.pointed:
            base = self.pointer[:self.stack[self.pointed - 1].end] if self.pointed else ""
            end, segs = len(base), []
            for frame in self.stack[self.pointed:level + 1]:
                end += len(frame.seg)
                frame.end = end
                segs.append(frame.seg)
            self.pointer, self.pointed = base + "".join(segs), level + 1
        return self.pointer[:self.stack[level].end]

    def _remember(self, low: int) -> None:
        """Note what is shown now, on the levels that may have changed (`low` and deeper)."""
        top = len(self.stack) - 1
        for level in range(low, top + 1):
            frame = self.stack[level]
            frame.done = len(frame.value)
            growing = level < top or self._scalar_shown()
            frame.shown = frame.done + growing
            if isinstance(frame.value, dict):
                frame.last_key = frame.key if growing else next(reversed(frame.value), None)
        self.depth, self.low = len(self.stack), len(self.stack)
        self.scalar = self._scalar() if self.token else self.result
        self.closed.clear()


def _member(path: str, key: Any) -> str:
    """The JSON pointer of a container's member (a dict's key or a list's index)."""
    return f"{path}/{_escape(str(key))}"


def _same(a: Any, b: Any) -> bool:
    """Whether two scalars are the same JSON value (1, 1.0 and True are not)."""
    return type(a) is type(b) and a == b


# ==============================================================================================
# Appendix B. Modules imported on first use
# ==============================================================================================

class _LazyModule:
    """A module imported on first use: asyncio alone costs ~25 ms to import, which code that
    never awaits should not pay. The first access swaps the real module into this namespace."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


if TYPE_CHECKING:
    import asyncio
    import inspect
    import json
else:
    asyncio, inspect, json = _LazyModule("asyncio"), _LazyModule("inspect"), _LazyModule("json")


if __name__ == "__main__":
    _demo()
