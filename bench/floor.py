"""The bare asyncio + httpx floor beside bench/daemon.py's footprint: the same requests, no more.

Run by ``bench/daemon.py --only footprint`` right after the daemon, against the same simulator,
pinned to the same core; not meant to be run by hand. Its one argument is a JSON file::

    {"seconds": 120, "token": "...", "polls": {"script": [[method, url, body], ...], ...}}

One task per script, each on a fixed 1 s schedule (phases spread over the second, as the
daemon's loops are), sends that script's requests of one poll in order, one after the other
as a tick does, reads each answer's JSON, and waits for the next second. One
``httpx.AsyncClient`` with httpx's defaults, as the daemon has. No coalmine import: this is
what the same HTTP work costs without coalmine. It prints the polls it made.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx


async def one_script(
    http: httpx.AsyncClient, requests: list[list[Any]], phase: float, until: float
) -> int:
    """Poll every second from ``phase`` until ``until``; returns the polls made."""
    due = time.monotonic() + phase
    polls = 0
    while due < until:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        for method, url, body in requests:
            response = await http.request(method, url, json=body)
            response.json()
        polls += 1
        due += 1.0
    return polls


async def main(config: dict[str, Any]) -> int:
    polls: dict[str, list[list[Any]]] = config["polls"]
    until = time.monotonic() + config["seconds"]
    headers = {"Authorization": f"Bearer {config['token']}"}
    async with httpx.AsyncClient(headers=headers, timeout=30.0) as http:
        done = await asyncio.gather(
            *(
                one_script(http, requests, i / len(polls), until)
                for i, requests in enumerate(polls.values())
            )
        )
    return sum(done)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        print(asyncio.run(main(json.load(file))))
