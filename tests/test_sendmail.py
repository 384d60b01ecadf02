"""`relay sendmail`: sendmail's command line, submitted to a real relay's listener."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import RelayProcess, relay_config, run_cli, wait_for

from relay.errors import UsageError
from relay.schedule import parse_rfc3339
from relay.sendmail import Options, parse_args, prepare, read_message, send_time


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    return make_relay(relay_config(tmp_path, None, None))


def stored(relay: RelayProcess, entry_id: str) -> tuple[dict, bytes]:
    wait_for(lambda: entry_id in relay.files("deferred"), what="the entry")
    data = (relay.spool / "deferred" / entry_id).read_bytes()
    _, header, content = data.split(b"\n", 2)
    return json.loads(header), content


def test_dash_t_takes_to_cc_bcc_and_removes_bcc(holding_relay: RelayProcess) -> None:
    """-t: recipients from To, Cc and Bcc; the Bcc header never leaves; -v prints the ID."""
    message = (b"From: cron@example.com\nTo: a@example.com\nCc: b@example.com\n"
               b"Bcc: hidden@example.com,\n  hidden2@example.com\nSubject: report\n\nall good\n")
    result = holding_relay.cli("sendmail", "-t", "-v", "-oi", stdin=message)
    assert result.returncode == 0, result.stderr
    entry_id = result.stdout.split()[-1]
    header, content = stored(holding_relay, entry_id)
    assert header["recipients"] == ["a@example.com", "b@example.com", "hidden@example.com",
                                    "hidden2@example.com"]
    assert b"Bcc" not in content and b"hidden" not in content
    assert b"\r\nTo: a@example.com\r\nCc: b@example.com\r\nSubject: report\r\n" in content
    assert content.endswith(b"\r\n\r\nall good\r\n")


def test_arguments_sender_name_and_added_headers(holding_relay: RelayProcess) -> None:
    """Recipients as arguments, -f sender, -F name; From, Date, Message-ID added if missing."""
    result = holding_relay.cli("sendmail", "-v", "-f", "app@example.com", "-FThe App",
                               "-odb", "-oem", "-U", "x@example.com, y@example.com",
                               stdin=b"Subject: hi\n\nbody\n")
    assert result.returncode == 0, result.stderr
    header, content = stored(holding_relay, result.stdout.split()[-1])
    assert header["sender"] == "app@example.com"
    assert header["recipients"] == ["x@example.com", "y@example.com"]
    assert b"From: The App <app@example.com>\r\n" in content
    assert b"\r\nDate: " in content and b"\r\nMessage-ID: <" in content


def test_configured_sender_is_the_default(make_relay, tmp_path: Path) -> None:
    """sendmail.sender in the config replaces user@host when -f is not given."""
    relay = make_relay(relay_config(tmp_path, None, None,
                                    sendmail={"sender": "noreply@example.com"}))
    result = relay.cli("sendmail", "-v", "user@example.com", stdin=b"Subject: x\n\nbody\n")
    assert result.returncode == 0, result.stderr
    header, content = stored(relay, result.stdout.split()[-1])
    assert header["sender"] == "noreply@example.com"
    assert b"From: noreply@example.com\r\n" in content


def test_listener_unreachable_exits_75_and_says_so(tmp_path: Path) -> None:
    """Nothing listening: exit 75 with a clear message; the caller keeps the message."""
    import yaml
    config = relay_config(tmp_path, None, None, listen={"port": 1})
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli(path, "sendmail", "user@example.com", stdin=b"Subject: x\n\nbody\n")
    assert result.returncode == 75
    assert "cannot hand the message to the relay" in result.stderr
    assert "not sent" in result.stderr


def test_malformed_address_exits_65(holding_relay: RelayProcess) -> None:
    result = holding_relay.cli("sendmail", "bad@@address", stdin=b"Subject: x\n\nbody\n")
    assert result.returncode == 65
    assert "553 5.1.3" in result.stderr
    assert holding_relay.files("incoming") + holding_relay.files("deferred") == []


def test_no_recipients_is_a_usage_error(holding_relay: RelayProcess) -> None:
    result = holding_relay.cli("sendmail", "-t", stdin=b"Subject: x\n\nbody\n")
    assert result.returncode == 64
    assert "no recipients" in result.stderr


@pytest.mark.parametrize("argv, expected", [
    (["-t", "-i"], Options(extract_recipients=True, dot_ends_input=False)),
    (["-oi", "-fme@x.example", "a@x.example"],
     Options(sender="me@x.example", recipients=["a@x.example"], dot_ends_input=False)),
    (["-r", "me@x.example", "-F", "Me", "--", "-odd@x.example"],
     Options(sender="me@x.example", full_name="Me", recipients=["-odd@x.example"])),
    (["-odb", "-oem", "-B", "8BITMIME", "-N", "never", "-bm", "-v", "a@x.example"],
     Options(recipients=["a@x.example"], verbose=True)),
])
def test_option_parsing(argv: list[str], expected: Options) -> None:
    """sendmail's flags as Postfix accepts them; harmless ones are ignored."""
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv, expected", [
    # cron (Debian), bsd-mailx and s-nail, logwatch and unattended-upgrades, PHP
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     Options(full_name="CronDaemon", dot_ends_input=False, recipients=["root"])),
    (["-i", "--", "root"], Options(dot_ends_input=False, recipients=["root"])),
    (["-oi", "-t"], Options(dot_ends_input=False, extract_recipients=True)),
    (["-ti"], Options(dot_ends_input=False, extract_recipients=True)),
    (["-Z", "-x", "-G", "-odi", "-e", "p", "-Ck", "a@x.example"],
     Options(recipients=["a@x.example"])),
    (["-bp"], Options(mode="queue")),
    (["-q"], Options(mode="flush")),
    (["-q30m"], Options(mode="flush")),
    (["-bv", "root"], Options(mode="verify", recipients=["root"])),
    (["-bi"], Options(mode="newaliases")),
    (["-I"], Options(mode="newaliases")),
    (["--help"], Options(mode="help")),
])
def test_debian_callers_and_unknown_flags(argv: list[str], expected: Options) -> None:
    """The lines Debian's programs run, grouped flags, the modes; unknown flags ignored."""
    assert parse_args(argv) == expected


@pytest.mark.parametrize("argv", [["-bs"], ["-bd"], ["-f"], ["--frobnicate"]])
def test_unsupported_options_are_usage_errors(argv: list[str]) -> None:
    """Modes the relay has no part for, a flag without its value, unknown long options."""
    with pytest.raises(UsageError):
        parse_args(argv)


def test_lone_dot_ends_input_unless_dash_i() -> None:
    assert read_message(b"a\n.\nb\n", dot_ends_input=True) == b"a\r\n"
    assert read_message(b"a\n.\nb\n", dot_ends_input=False) == b"a\r\n.\r\nb\r\n"


def test_message_without_headers_gets_them_before_its_body() -> None:
    """A bare text on stdin (echo hi | sendmail x) is body; headers are added above it."""
    sender, recipients, message = prepare(b"just a line\r\n", Options(recipients=["a@x.example"]),
                                          "root@host.example")
    assert (sender, recipients) == ("root@host.example", ["a@x.example"])
    head, body = message.split(b"\r\n\r\n", 1)
    assert head.startswith(b"From: root@host.example\r\nDate: ")
    assert body == b"just a line\r\n"


class FakeListener:
    """A minimal SMTP listener on loopback that takes one session and keeps the command
    lines it got: what `relay sendmail` would send to a listener that offers (or not)
    FUTURERELEASE, whatever the relay's own listener offers today."""

    def __init__(self, futurerelease: bool) -> None:
        self.futurerelease = futurerelease
        self.lines: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.server.accept()
        with connection, connection.makefile("rb") as reader:
            connection.sendall(b"220 fake ESMTP\r\n")
            for raw in reader:
                line = raw.decode().rstrip("\r\n")
                self.lines.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    extra = b"250-FUTURERELEASE 2592000 2027-01-03T12:00:00Z\r\n" \
                        if self.futurerelease else b""
                    connection.sendall(b"250-fake\r\n" + extra + b"250 8BITMIME\r\n")
                elif verb == "DATA":
                    connection.sendall(b"354 go ahead\r\n")
                    for body in reader:
                        if body == b".\r\n":
                            break
                    connection.sendall(b"250 2.0.0 Ok: queued as 00000000000000000ABCD\r\n")
                elif verb == "QUIT":
                    connection.sendall(b"221 bye\r\n")
                    return
                else:
                    connection.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake_listener(request: pytest.FixtureRequest,
                  tmp_path: Path) -> Iterator[tuple[FakeListener, Path]]:
    listener = FakeListener(futurerelease=request.param)
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(relay_config(tmp_path, None, None,
                                                  listen={"port": listener.port})))
    yield listener, config
    listener.close()


@pytest.mark.parametrize("argv, send_at, send_in", [
    (["--send-at", "2026-12-05T09:00:00Z", "a@x.example"], "2026-12-05T09:00:00Z", None),
    (["--send-at=2026-12-05T09:00:00Z", "a@x.example"], "2026-12-05T09:00:00Z", None),
    (["--send-in", "5m", "-t"], None, "5m"),
    (["-oi", "--send-in=2h", "a@x.example"], None, "2h"),
])
def test_send_at_and_send_in_are_read_in_both_forms(argv: list[str], send_at: str | None,
                                                    send_in: str | None) -> None:
    """--send-at TIME, --send-at=TIME, --send-in DURATION, --send-in=DURATION."""
    options = parse_args(argv)
    assert (options.send_at, options.send_in) == (send_at, send_in)


@pytest.mark.parametrize("argv, fragment", [
    (["--send-at", "2026-12-05T09:00:00Z", "--send-in", "5m", "a@x.example"], "not both"),
    (["--send-in"], "needs a value"),
    (["--send-at="], "needs a value"),
])
def test_send_flags_that_cannot_be_honoured_are_usage_errors(argv: list[str],
                                                             fragment: str) -> None:
    """Both flags at once, or either without a value: usage errors."""
    with pytest.raises(UsageError, match=fragment):
        parse_args(argv)


def test_send_time_comes_from_either_flag_and_a_past_time_means_now() -> None:
    """A duration from now, or a time; a time already past, or none, sends now."""
    now = 1_796_457_600.0  # 2026-12-05T08:00:00Z
    assert send_time(parse_args(["--send-in", "5m"]), now) == now + 300
    assert send_time(parse_args(["--send-at", "2026-12-05T09:00:00Z"]), now) == now + 3600
    assert send_time(parse_args(["--send-at", "2026-12-05T07:00:00Z"]), now) is None
    assert send_time(parse_args([]), now) is None


@pytest.mark.parametrize("argv, flag", [(["--send-in", "soon"], "--send-in"),
                                        (["--send-at", "after lunch"], "--send-at")])
def test_an_unreadable_send_time_names_its_flag(argv: list[str], flag: str) -> None:
    """A value that is no duration or time is a usage error naming the flag."""
    with pytest.raises(UsageError, match=f"^{flag}: "):
        send_time(parse_args(argv), 0.0)


@pytest.mark.parametrize("fake_listener", [True], indirect=True)
def test_send_in_asks_the_listener_to_hold_the_message_with_holduntil(
        fake_listener: tuple[FakeListener, Path]) -> None:
    """MAIL carries HOLDUNTIL=<the time, rounded up to the second, RFC 3339 UTC>."""
    listener, config = fake_listener
    before = time.time()
    result = run_cli(config, "sendmail", "--send-in", "2h", "-v", "a@x.example",
                     stdin=b"Subject: x\n\nbody\n")
    after = time.time()
    assert result.returncode == 0, result.stderr
    [mail] = [line for line in listener.lines if line.upper().startswith("MAIL")]
    hold = mail.split("HOLDUNTIL=")[1].split()[0]
    assert before + 7200 <= parse_rfc3339(hold) <= after + 7201


@pytest.mark.parametrize("fake_listener", [False], indirect=True)
def test_a_listener_without_futurerelease_gets_no_message_and_exit_65(
        fake_listener: tuple[FakeListener, Path]) -> None:
    """Rather than send it now, sendmail says the relay cannot schedule, and sends nothing."""
    listener, config = fake_listener
    result = run_cli(config, "sendmail", "--send-at", "2099-01-01T00:00:00Z", "a@x.example",
                     stdin=b"Subject: x\n\nbody\n")
    assert result.returncode == 65
    assert "does not offer scheduled delivery (FUTURERELEASE)" in result.stderr
    assert "not sent" in result.stderr
    assert [line.split()[0].upper() for line in listener.lines] == ["EHLO", "QUIT"]
