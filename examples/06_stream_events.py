"""6. Streaming events: every step's start, stream and end, as they happen.

Guide section "Using Stream Events": first a chat model alone, then `model | JsonOutputParser()`,
printing the model's chunks and the parser's snapshots from one event stream.
"""
import asyncio

from minichain import GenericFakeChatModel, JsonOutputParser

COUNTRIES = ('{"countries": [{"name": "France", "population": 67413000}, '
             '{"name": "Spain", "population": 47351567}]}')


async def main() -> None:
    model = GenericFakeChatModel(messages=iter(["hello world"]))
    events = []
    async for event in model.astream_events("hello"):
        events.append(event)
    for event in events[:2] + events[-1:]:
        print(event["event"], event["name"], event["data"])

    chain = GenericFakeChatModel(messages=iter([COUNTRIES])) | JsonOutputParser()
    num_events = 0
    async for event in chain.astream_events("output a list of countries in JSON format"):
        kind = event["event"]
        if kind == "on_chat_model_stream":
            print(f"Chat model chunk: {repr(event['data']['chunk'].content)}", flush=True)
        if kind == "on_parser_stream":
            print(f"Parser chunk: {event['data']['chunk']}", flush=True)
        num_events += 1
        if num_events > 20:
            # Truncate the output
            print("...")
            break


asyncio.run(main())
