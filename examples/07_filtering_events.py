"""7. Filtering events by name, by type and by tag (and the sync `stream_events`).

Guide section "Filtering Events". `stream_events` is minichain's addition: the same events
without an event loop.
"""
import asyncio

from minichain import GenericFakeChatModel, JsonOutputParser

ANSWER = '{"countries": [{"name": "France"}]}'


def make_chain(tags=None):  # type: ignore[no-untyped-def]
    model = GenericFakeChatModel(messages=iter([ANSWER])).with_config({"run_name": "model"})
    chain = model | JsonOutputParser().with_config({"run_name": "my_parser"})
    return chain.with_config({"tags": tags}) if tags else chain


def show(event: dict) -> None:
    print(f"  {event['event']:<22} {event['name']:<16} {event['tags']} {event['data']}")


async def main() -> None:
    print("include_names=['my_parser']")
    async for event in make_chain().astream_events("x", include_names=["my_parser"]):
        show(event)
    print("include_types=['chat_model']")
    async for event in make_chain().astream_events("x", include_types=["chat_model"]):
        show(event)
    print("include_tags=['my_chain'] (tags are inherited by every step)")
    async for event in make_chain(["my_chain"]).astream_events("x", include_tags=["my_chain"]):
        print(f"  {event['event']:<22} {event['name']:<16} {event['tags']}")


asyncio.run(main())

print("sync stream_events, include_types=['parser']")
for event in make_chain().stream_events("x", include_types=["parser"]):
    show(event)
