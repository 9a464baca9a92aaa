"""3. Working with input streams: JsonOutputParser yields the partial object as the JSON grows.

Guide section "Working with Input Streams": each line is a new snapshot, printed as it comes.
"""
import asyncio

from minichain import GenericFakeChatModel, JsonOutputParser

COUNTRIES = ('{"countries": [{"name": "France", "population": 67413000}, '
             '{"name": "Spain", "population": 47351567}, '
             '{"name": "Japan", "population": 125584838}]}')

model = GenericFakeChatModel(messages=iter([COUNTRIES]))
chain = model | JsonOutputParser()


async def main() -> None:
    async for text in chain.astream(
        "output a list of the countries france, spain and japan and their populations in JSON "
        'format. Use a dict with an outer key of "countries" which contains a list of '
        'countries. Each country should have the key `name` and `population`'
    ):
        print(text, flush=True)


asyncio.run(main())
