"""4. Generator functions: a plain function stops the stream; an async generator keeps it going.

Guide sections "Working with Input Streams" and "Generator Functions": the function that
takes the whole input prints one list at the end; the one that takes the input *stream* prints
each country name as soon as it appears.
"""
import asyncio
from typing import Any, AsyncIterator

from minichain import GenericFakeChatModel, JsonOutputParser

COUNTRIES = ('{"countries": [{"name": "France", "population": 67413000}, '
             '{"name": "Spain", "population": 47351567}, '
             '{"name": "Japan", "population": 125584838}]}')


def _extract_country_names(inputs: Any) -> Any:
    """A function that does not operate on input streams and breaks streaming."""
    if not isinstance(inputs, dict):
        return ""
    if "countries" not in inputs:
        return ""
    countries = inputs["countries"]
    if not isinstance(countries, list):
        return ""
    return [country.get("name") for country in countries if isinstance(country, dict)]


async def _extract_country_names_streaming(input_stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    """A function that operates on input streams."""
    country_names_so_far = set()
    async for input in input_stream:
        if not isinstance(input, dict) or "countries" not in input:
            continue
        countries = input["countries"]
        if not isinstance(countries, list):
            continue
        for country in countries:
            name = country.get("name") if isinstance(country, dict) else None
            if not name:
                continue
            if name not in country_names_so_far:
                yield name
                country_names_so_far.add(name)


async def main() -> None:
    chain = GenericFakeChatModel(messages=iter([COUNTRIES])) | JsonOutputParser() | _extract_country_names
    async for text in chain.astream("output a list of countries in JSON format"):
        print(text, end="|", flush=True)
    print()
    chain2 = (GenericFakeChatModel(messages=iter([COUNTRIES])) | JsonOutputParser()
              | _extract_country_names_streaming)
    async for text in chain2.astream("output a list of countries in JSON format"):
        print(text, end="|", flush=True)
    print()


asyncio.run(main())
