"""1. Streaming a chat model: tokens as they arrive, and chunks that add up with `+`.

Guide section "Using Stream": `model.stream` / `model.astream` yield AIMessageChunks.
"""
import asyncio

from minichain import GenericFakeChatModel

ANSWER = "The sky appears blue during the day."

model = GenericFakeChatModel(messages=iter([ANSWER, ANSWER]))

chunks = []
for chunk in model.stream("what color is the sky?"):
    chunks.append(chunk)
    print(chunk.content, end="|", flush=True)
print()


async def main() -> None:
    async for chunk in model.astream("what color is the sky?"):
        print(chunk.content, end="|", flush=True)
    print()


asyncio.run(main())

print(repr(chunks[0]))
print(repr(chunks[0] + chunks[1] + chunks[2] + chunks[3] + chunks[4]))
