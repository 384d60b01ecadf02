"""Local senders through the relay's sendmail, mailq and newaliases links, the way Debian's
programs call them: cron, logwatch, unattended-upgrades, PHP, and bsd-mailx's `mail`."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RelayProcess, relay_config, wait_for
from upstream import Transaction, Upstream

ADDRESSES = {"hostname": "vm.example.com",
             "aliases": {"root": "ops@example.com", "www-data": "root"}}
USER = getpass.getuser()  # the invoking user: the sender when none is given

# As Debian's cron writes a job's output (do_command.c), with 8-bit text in it.
CRON_MESSAGE = (
    "From: root (Cron Daemon)\n"
    "To: root\n"
    "Subject: Cron <root@vm> test -x /usr/sbin/anacron || run-parts --report /etc/cron.daily\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "X-Cron-Env: <SHELL=/bin/sh>\n"
    "X-Cron-Env: <HOME=/root>\n"
    "X-Cron-Env: <PATH=/usr/bin:/bin>\n"
    "X-Cron-Env: <LOGNAME=root>\n"
    "\n"
    "/etc/cron.daily/logrotate:\n"
    "error: Größe der Datei überschritten\n"
    ".\n"
    "run-parts: /etc/cron.daily/logrotate exited with return code 1\n"
).encode()

# logwatch's report (sendmail -t) and unattended-upgrades' (sendmail -oi -t).
LOGWATCH_MESSAGE = (b"To: root\nFrom: Logwatch <root>\nSubject: Logwatch for vm (Linux)\n"
                    b"MIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\n"
                    b'Content-Type: text/plain; charset="iso-8859-1"\n\n'
                    b" ################### Logwatch 7.8 ####################\n"
                    b"        Processing Initiated: Sat Dec  5 06:25:01 2026\n")
UPGRADES_MESSAGE = (b'Content-Type: text/plain; charset="utf-8"\nMIME-Version: 1.0\n'
                    b"Content-Transfer-Encoding: 8bit\n"
                    b"Subject: unattended-upgrades result for vm: SUCCESS\n"
                    b"From: root\nTo: root\n\nUnattended upgrade result: All upgrades installed\n")
PHP_MESSAGE = (b"To: customer@example.org\nSubject: Your order\n"
               b"From: Shop <shop@example.com>\nX-PHP-Originating-Script: 33:order.php\n\n"
               b"Thank you.\n")


@pytest.fixture
def links(tmp_path: Path) -> Path:
    """sendmail, mailq and newaliases as symbolic links to the installed `relay` script,
    as the README installs them in /usr/sbin and /usr/bin."""
    relay = Path(sys.executable).with_name("relay")
    assert relay.exists(), "the relay script is installed with `pip install -e .`"
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("sendmail", "mailq", "newaliases"):
        (directory / name).symlink_to(relay)
    return directory


@pytest.fixture
def relay(make_relay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> RelayProcess:
    return make_relay(relay_config(tmp_path, upstream, ca_file, addresses=ADDRESSES))


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    """No upstream: what it accepts stays deferred in its spool."""
    return make_relay(relay_config(tmp_path, None, None, addresses=ADDRESSES))


def run(relay: RelayProcess, links: Path, program: str, *args: str, stdin: bytes = b"",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A link run as other programs run it: by its name, the config from $RELAY_CONFIG."""
    environment = {**os.environ, "RELAY_CONFIG": str(relay.client_config_path), **(env or {})}
    result = subprocess.run([str(links / program), *args], input=stdin, check=False,
                            capture_output=True, env=environment, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def delivered(upstream: Upstream) -> Transaction:
    return wait_for(lambda: upstream.transactions[0] if upstream.transactions else None,
                    what="the upstream transaction")


def test_cron_invocation_reaches_roots_alias(relay: RelayProcess, links: Path,
                                             upstream: Upstream) -> None:
    """cron's exact line; the message arrives at root's alias, from root at the relay's
    name, with cron's display name kept and its 8-bit body as it was."""
    result = run(relay, links, "sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                 stdin=CRON_MESSAGE)
    assert result.returncode == 0, result.stderr
    transaction = delivered(upstream)
    assert transaction.sender == f"{USER}@vm.example.com"
    assert transaction.recipients == ("ops@example.com",)
    assert b"\r\nFrom: Cron Daemon <root@vm.example.com>\r\nTo: root\r\n" in transaction.data
    assert transaction.data.endswith(CRON_MESSAGE.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n"))
    assert transaction.data.count(b"X-Cron-Env: ") == 4


@pytest.mark.parametrize("argv, message, recipients, from_field", [
    (["-t"], LOGWATCH_MESSAGE, ("ops@example.com",), b"From: Logwatch <root@vm.example.com>"),
    (["-oi", "-t"], UPGRADES_MESSAGE, ("ops@example.com",), b"From: root@vm.example.com"),
    (["-t", "-i"], PHP_MESSAGE, ("customer@example.org",), b"From: Shop <shop@example.com>"),
    (["-i", "--", "root"], b"Subject: s-nail\n\nhello\n", ("ops@example.com",),
     f"From: {USER}@vm.example.com".encode()),
])
def test_other_callers_reach_their_recipients(
        relay: RelayProcess, links: Path, upstream: Upstream, argv: list[str],
        message: bytes, recipients: tuple[str, ...], from_field: bytes) -> None:
    """logwatch, unattended-upgrades and PHP (-t: recipients from To:), s-nail (-i --
    root): bare names through the aliases; From: qualified only where it was bare."""
    result = run(relay, links, "sendmail", *argv, stdin=message)
    assert result.returncode == 0, result.stderr
    transaction = delivered(upstream)
    assert transaction.recipients == recipients
    assert b"\r\n" + from_field + b"\r\n" in transaction.data


def test_bsd_mailx_mail_reaches_roots_alias(relay: RelayProcess, links: Path,
                                            upstream: Upstream, tmp_path: Path) -> None:
    """`echo test | mail -s test root` (Debian's bsd-mailx) through the sendmail link."""
    mailx = shutil.which("bsd-mailx")
    if mailx is None:
        pytest.skip("bsd-mailx is not installed (.ci/run installs it)")
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={links / 'sendmail'}\n")
    environment = {**os.environ, "RELAY_CONFIG": str(relay.client_config_path),
                   "MAILRC": str(rc), "HOME": str(tmp_path)}
    result = subprocess.run([mailx, "-s", "test", "root"], input=b"test\n",
                            check=False, capture_output=True, env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    transaction = delivered(upstream)
    assert transaction.sender == f"{USER}@vm.example.com"
    assert transaction.recipients == ("ops@example.com",)
    assert b"\r\nSubject: test\r\n" in transaction.data
    assert transaction.data.endswith(b"\r\n\r\ntest\r\n")


def test_refused_recipient_exits_65_with_the_reply(holding_relay: RelayProcess,
                                                  links: Path) -> None:
    """A local name without an alias: nothing queued, exit 65, the reply on stderr."""
    result = run(holding_relay, links, "sendmail", "-i", "--", "nobody", stdin=b"hi\n")
    assert result.returncode == 65
    assert "recipient <nobody> refused by the relay: 550 5.1.1" in result.stderr
    assert "addresses.aliases" in result.stderr
    assert holding_relay.queued() == []


@pytest.mark.parametrize("program, args", [("mailq", []), ("sendmail", ["-bp"])])
def test_mailq_and_sendmail_bp_list_the_queue(holding_relay: RelayProcess, links: Path,
                                              program: str, args: list[str]) -> None:
    """The queue listing, as `relay queue` prints it."""
    entry_id = holding_relay.send("app@example.org", ["root"], b"Subject: s\r\n\r\nbody\r\n")
    wait_for(lambda: entry_id in holding_relay.files("deferred"), what="the entry")
    result = run(holding_relay, links, program, *args)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^{entry_id} .* deferred .* <app@example.org> +ops@example.com",
                     result.stdout, re.MULTILINE)
    assert re.search(r"\n-- 1 message, \S+: 0 queued, 0 active, 1 deferred, 0 held, 0 failed, "
                     r"0 scheduled\n$", result.stdout)


def test_sendmail_q_flushes_deferred_mail(holding_relay: RelayProcess, links: Path) -> None:
    """-q: every deferred message is due now, as `relay queue flush`."""
    entry_id = holding_relay.send("app@example.org", ["root"], b"Subject: s\r\n\r\nbody\r\n")
    wait_for(lambda: entry_id in holding_relay.files("deferred"), what="the entry")
    result = run(holding_relay, links, "sendmail", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{entry_id}: ")
    assert "-- flush: 1 message" in result.stderr


def test_newaliases_succeeds_and_points_at_relay_yaml(holding_relay: RelayProcess,
                                                      links: Path) -> None:
    """Package scripts call newaliases: exit 0, saying where aliases live."""
    result = run(holding_relay, links, "newaliases")
    assert result.returncode == 0, result.stderr
    assert "aliases live in relay.yaml" in result.stdout
    assert str(holding_relay.client_config_path) in result.stdout


def test_dash_bv_says_where_each_recipient_goes(holding_relay: RelayProcess,
                                                links: Path) -> None:
    """-bv: one line per recipient from the config's rules; exit 65 if any is refused."""
    result = run(holding_relay, links, "sendmail", "-bv", "www-data", "user@example.org",
                 "nobody")
    assert result.returncode == 65
    assert result.stdout.splitlines() == [
        "www-data: local; relayed to ops@example.com (addresses.aliases)",
        "user@example.org: relayed as it is",
        ("nobody: refused: 550 5.1.1 <nobody>: no such local recipient: addresses.aliases "
         'has no entry for nobody, and no "*"'),
    ]


@pytest.mark.parametrize("program, args, expected", [
    ("sendmail", ["--help"], "usage: sendmail"),
    ("mailq", ["--help"], "usage: relay queue"),
    ("newaliases", ["--help"], "usage: sendmail"),
])
def test_every_link_answers_help(holding_relay: RelayProcess, links: Path, program: str,
                                 args: list[str], expected: str) -> None:
    result = run(holding_relay, links, program, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected)


@pytest.mark.parametrize("args, expected", [
    (["--version"], "relay 0.1.0"),
    (["--help"], "usage: relay"),
    (["sendmail", "--help"], "usage: sendmail"),
    (["queue", "--help"], "usage: relay queue"),
    (["check", "--help"], "usage: relay check"),
])
def test_relay_answers_version_and_help(args: list[str], expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "relay", *args], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected)


def test_sendmail_leaves_bare_names_to_the_listener(holding_relay: RelayProcess,
                                                    links: Path) -> None:
    """The link submits `root` and `www-data` as given: the listener's aliases decide,
    and the queue entry shows both."""
    result = run(holding_relay, links, "sendmail", "-v", "-i", "root", "www-data",
                 stdin=b"Subject: s\n\nbody\n")
    assert result.returncode == 0, result.stderr
    entry_id = result.stdout.split()[-1]
    wait_for(lambda: entry_id in holding_relay.files("deferred"), what="the entry")
    shown = json.loads(holding_relay.cli("queue", "show", entry_id, "--json").stdout)
    assert shown["original_recipients"] == ["root", "www-data"]
    assert [r["address"] for r in shown["recipients"]] == ["ops@example.com"]
