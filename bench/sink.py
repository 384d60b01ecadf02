"""A counting SMTP sink for the benchmark: `python bench/sink.py PORT COUNT_FILE [DELAY]`.

Accepts every message on 127.0.0.1:PORT, waits DELAY seconds before answering each final
dot (a slow provider), and keeps the number of messages received in COUNT_FILE (rewritten
every 50 ms), so the benchmark can tell when a server has delivered everything. The same
sink serves the relay and Postfix, so neither gets a faster provider than the other.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class Counter:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received += 1
        return "250 2.0.0 Ok: queued"


async def main(port: int, count_file: Path, delay: float) -> None:
    counter = Counter(delay)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(counter, decode_data=False, enable_SMTPUTF8=True, hostname="sink",
                     data_size_limit=None),
        host="127.0.0.1", port=port, backlog=512)
    written = -1
    async with server:
        while True:
            if counter.received != written:
                written = counter.received
                count_file.write_text(str(written))
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]),
                     float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
