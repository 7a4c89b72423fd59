"""A LUNA-style lambda: `async def main(request) -> dict`, with a dependency (humanize)."""

import humanize


async def main(request):
    body = request.json or {}
    data = body.get("data")
    answer = {"result": data}
    if isinstance(data, (int, float)):
        answer["words"] = humanize.intword(data) if data >= 1_000_000 else humanize.intcomma(data)
    print(f"called with {data!r}")
    return answer
