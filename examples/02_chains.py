"""2. Chains: `prompt | model | parser` streams, because every step after the prompt streams.

Guide section "Chains": StrOutputParser turns message chunks into strings as they pass.
"""
import asyncio

from minichain import ChatPromptTemplate, GenericFakeChatModel, StrOutputParser

model = GenericFakeChatModel(messages=iter([
    "Why don't parrots make good secret agents? Because they always repeat everything!"]))
prompt = ChatPromptTemplate.from_template("tell me a joke about {topic}")
parser = StrOutputParser()
chain = prompt | model | parser


async def main() -> None:
    async for chunk in chain.astream({"topic": "parrot"}):
        print(chunk, end="|", flush=True)
    print()


asyncio.run(main())
