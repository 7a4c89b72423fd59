import asyncio
import json
import sys

import nats


async def main(url: str, seed_file: str) -> None:
    nc = await nats.connect(url, nkeys_seed=seed_file, inbox_prefix="_INBOX_auditor")
    js = nc.jetstream()
    sub = await js.pull_subscribe("lambdabus.lifecycle.>", durable="my-audit", stream="LIFECYCLE")
    for msg in await sub.fetch(100, timeout=5):
        event = json.loads(msg.data)
        print(event["time"], event["type"], event["subject"], event.get("source"))
        await msg.ack()
    await nc.close()


asyncio.run(main(*sys.argv[1:3]))  # from `lambdabus credentials audit`: URL, nkey file
