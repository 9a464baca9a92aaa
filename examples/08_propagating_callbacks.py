"""8. Propagating callbacks: runnables called inside a tool or a function report their events
under it, with nothing passed by hand (the config travels in a context variable).

Guide section "Propagating Callbacks": `bad_tool` reports the nested run just like
`correct_tool` (as langchain_core does on Python 3.11+); then `reverse_and_double` as a
RunnableLambda and as a `@chain`; then a custom event.
"""
import asyncio

from minichain import RunnableLambda, adispatch_custom_event, chain, tool


def reverse_word(word: str) -> str:
    return word[::-1]


reverse_word = RunnableLambda(reverse_word)  # type: ignore[assignment]


@tool
def bad_tool(word: str) -> str:
    """Custom tool that doesn't propagate callbacks."""
    return reverse_word.invoke(word)  # type: ignore[attr-defined, no-any-return]


@tool
def correct_tool(word: str, callbacks) -> str:  # type: ignore[no-untyped-def]
    """A tool that correctly propagates callbacks."""
    return reverse_word.invoke(word, {"callbacks": callbacks})  # type: ignore[attr-defined, no-any-return]


async def reverse_and_double(word: str) -> str:
    return await reverse_word.ainvoke(word) * 2  # type: ignore[attr-defined, no-any-return]


@chain
async def reverse_and_double_chain(word: str) -> str:
    return await reverse_word.ainvoke(word) * 2  # type: ignore[attr-defined, no-any-return]


@chain
async def slow_thing(some_input: str) -> str:
    await adispatch_custom_event("progress_event", {"message": "Finished step 1 of 3"})
    return "Done"


async def main() -> None:
    for runnable, value in [(bad_tool, "hello"), (correct_tool, "hello"),
                            (RunnableLambda(reverse_and_double), "1234"),
                            (reverse_and_double_chain, "1234"), (slow_thing, "some_input")]:
        print(f"{runnable.get_name()}:")
        async for event in runnable.astream_events(value):
            depth = "    " * len(event["parent_ids"])
            print(f"  {depth}{event['event']} {event['name']} {event['data']}")


asyncio.run(main())
