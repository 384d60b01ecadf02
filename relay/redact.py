"""Addresses shown as j***@example.com, for operators who must keep them out of logs
(`log.redact_addresses`): the first character of the local part and the whole domain
stay, so a reader can still tell one domain's trouble from another's.

Pure functions on text; relay.log applies them to each event's fields, and the history
and stats output to what they print.
"""

from __future__ import annotations

import re

# Something@domain inside free text (an upstream reply, a reason): the local part runs
# back to a space, '<', quote or the like, the domain to the next such character.
_IN_TEXT = re.compile(r"""([^\s<>()\[\]"',;:@]+)@([^\s<>()\[\]"',;:@]+)""")


def redact_address(address: str) -> str:
    """`john@example.com` as `j***@example.com`; the null sender stays empty, and text
    without an '@' keeps only its first character."""
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return address[0] + "***"
    return (local[:1] or "") + "***@" + domain


def redact_text(text: str) -> str:
    """Every address in `text` redacted, the rest as it was."""
    if "@" not in text:
        return text
    return _IN_TEXT.sub(lambda m: m.group(1)[0] + "***@" + m.group(2), text)
