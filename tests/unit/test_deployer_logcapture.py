"""Log capture of instances: lines, cut lines, the listening line, the rate limit, the tail."""

from __future__ import annotations

import asyncio

from lambdabus_deployer.logcapture import InstanceLog, LineBudget, listening_port
from lambdabus_deployer.plan import DesiredRevision
from lambdabus_events.models import LogLine

REV = DesiredRevision(
    namespace="default",
    name="hello",
    uid="u-1",
    generation=4,
    build_generation=3,
    artifact="file:///a/manifest.json",
    runtime="python3.11",
    env=(),
    replicas=1,
    memory=256,
    timeout=30,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def capture(
    *, max_bytes: int = 64, rate: int = 1000, clock: Clock | None = None
) -> tuple[InstanceLog, list[LogLine]]:
    lines: list[LogLine] = []

    async def sink(line: LogLine) -> None:
        lines.append(line)

    log = InstanceLog(
        instance="hello-1",
        revision=REV,
        sink=sink,
        max_bytes=max_bytes,
        rate=rate,
        clock=clock or Clock(),
    )
    return log, lines


def pipe(*chunks: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


def test_line_budget_admits_a_rate_per_second() -> None:
    budget = LineBudget(3)
    assert budget.take(10.0, 2) == 2
    assert budget.take(10.5, 2) == 1
    assert budget.take(10.9) == 0
    assert budget.take_dropped() == 2
    assert budget.take_dropped() == 0
    assert budget.take(11.0, 5) == 3  # a new window


def test_the_listening_line() -> None:
    assert listening_port(b'{"event": "listening", "port": 4321}') == 4321
    assert listening_port(b'{"event": "listening"}') is None
    assert listening_port(b'{"event": "listening", "port": 0}') is None
    assert listening_port(b"listening on 4321") is None
    assert listening_port(b'{"event": "other", "port": 1}') is None


async def test_lines_are_published_as_runtime_log_lines() -> None:
    log, lines = capture()
    listening: asyncio.Future[int | str] = asyncio.get_running_loop().create_future()
    await log.pump(
        pipe(b"first li", b'ne\n{"event": "listening", "port": 8123}\nsec', b"ond\r\nlast"),
        "stdout",
        listening,
    )
    assert listening.result() == 8123
    assert [x.line for x in lines] == ["first line", "second", "last"]
    sample = lines[0]
    assert (sample.kind, sample.stream, sample.instance) == ("runtime", "stdout", "hello-1")
    assert (sample.namespace, sample.name, sample.uid, sample.generation) == (
        "default",
        "hello",
        "u-1",
        4,
    )


async def test_a_listening_line_after_ready_is_an_ordinary_line() -> None:
    log, lines = capture()
    done: asyncio.Future[int | str] = asyncio.get_running_loop().create_future()
    done.set_result(1)
    await log.pump(pipe(b'{"event": "listening", "port": 9}\n'), "stdout", done)
    assert [x.line for x in lines] == ['{"event": "listening", "port": 9}']


async def test_long_lines_are_cut_and_say_so() -> None:
    log, lines = capture(max_bytes=256)
    await log.pump(
        pipe(b"a" * 300 + b"\n", b"b" * 200, b"b" * 200, b"b" * 200 + b"\nok\n"), "stderr"
    )
    assert [x.line[:3] for x in lines] == ["aaa", "bbb", "ok"]
    assert lines[0].line == "a" * 256 + " … [truncated: 44 more bytes; lines are cut at 256 bytes]"
    assert lines[1].line.startswith("b" * 256 + " … [truncated: 344 more bytes")
    assert lines[2].line == "ok"


async def test_beyond_the_rate_lines_are_dropped_and_counted() -> None:
    clock = Clock()
    log, lines = capture(rate=5, clock=clock)
    await log.pump(pipe(b"".join(b"line %d\n" % i for i in range(1000))), "stdout")
    assert [x.line for x in lines] == [f"line {i}" for i in range(5)]
    await log.flush_dropped()
    assert lines[-1].stream == "system"
    assert lines[-1].line == "dropped 995 lines: more than 5 lines a second"
    await log.flush_dropped()
    assert len(lines) == 6  # said once
    assert log.tail_text()[-1] == "line 999"  # the tail keeps what was dropped
    assert len(log.tail) == 50
    clock.now += 1
    await log.pump(pipe(b"later\n"), "stdout")
    assert lines[-1].line == "later"


async def test_a_flood_is_drained_fast() -> None:
    log, lines = capture(rate=100)
    flood = b"x" * 99 + b"\n"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await log.pump(pipe(*(flood * 1000 for _ in range(100))), "stdout")  # 10 MB, 100k lines
    assert loop.time() - started < 2
    assert len(lines) == 100


async def test_the_runtime_invocation_tag_becomes_the_records_field() -> None:
    log, lines = capture()
    await log.pump(
        pipe(
            b"\x1eab12cd\x1fduring one call\n",
            b"before any call\n",
            b"\x1e\x1fno id\n",  # not a tag: kept as written
            b"\x1eid with space\x1fnot a tag either\n",
        ),
        "stdout",
    )
    assert [(x.invocation, x.line) for x in lines] == [
        ("ab12cd", "during one call"),
        (None, "before any call"),
        (None, "\x1e\x1fno id"),
        (None, "\x1eid with space\x1fnot a tag either"),
    ]
    assert log.tail_text()[0] == "during one call"  # a crash message shows no tags
