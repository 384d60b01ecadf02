"""Routing: a message's route by sender domain, the choice per attempt, what follows it."""

from __future__ import annotations

import pytest

from relay.breaker import Breaker, Circuit
from relay.config import DeliveryConfig, MailgunApiConfig, Rate, UpstreamConfig
from relay.outcome import AttemptResult, Reaction, Reply, Stage
from relay.ratelimit import Bucket
from relay.routing import Gate, choose, react, refusal, route, sender_domain

CONFIG = DeliveryConfig(retry_min=60, retry_max=3600)
T0 = 1_800_000_000.0
GRACE = 300.0
MG = UpstreamConfig(host="smtp.mailgun.org", name="mg", sender_domains=("mg.example.com",))
OTHER = UpstreamConfig(host="smtp.mailgun.org", name="other",
                       sender_domains=("other.example", "xn--bcher-kva.example"))
ANY = MailgunApiConfig(domain="mg.example.com", name="any")
PACED = UpstreamConfig(host="smtp.example.net", name="paced", rate=Rate(10, 1.0))
SENT = AttemptResult("mg", recipients={"u@x.example": Reply(250, "2.0.0 Ok")})


@pytest.mark.parametrize("sender, domain", [
    ("app@mg.example.com", "mg.example.com"),
    ("App@MG.Example.Com", "mg.example.com"),
    ("a@b@bücher.example", "xn--bcher-kva.example"),
    ("", None),
    ("root", None),
])
def test_sender_domain(sender: str, domain: str | None) -> None:
    assert sender_domain(sender) == domain


@pytest.mark.parametrize("upstreams, sender, names", [
    ((MG, OTHER, ANY), "app@mg.example.com", ["mg", "any"]),
    ((MG, OTHER, ANY), "app@OTHER.example", ["other", "any"]),
    ((MG, OTHER, ANY), "app@bücher.example", ["other", "any"]),
    ((MG, OTHER, ANY), "app@elsewhere.example", ["any"]),
    ((ANY, MG), "app@mg.example.com", ["any", "mg"]),
    ((MG, OTHER, ANY), "", ["any"]),
    ((MG, OTHER), "app@sub.mg.example.com", []),
])
def test_route_keeps_matching_and_unrestricted_upstreams_in_order(
        upstreams: tuple[UpstreamConfig | MailgunApiConfig, ...], sender: str,
        names: list[str]) -> None:
    """Upstreams whose sender_domains hold the sender's domain, or that have none, in order."""
    assert [u.name for u in route(upstreams, sender)] == names


@pytest.mark.parametrize("upstreams, sender, reply", [
    ((MG, OTHER), "app@elsewhere.example",
     Reply(553, "5.7.1 No upstream relays mail from the domain elsewhere.example")),
    ((MG, OTHER), "", Reply(553, "5.7.1 No upstream relays mail from the null sender <>")),
    ((MG, OTHER), "app@mg.example.com", None),
    ((MG, ANY), "app@elsewhere.example", None),
    ((), "app@elsewhere.example", None),
])
def test_refusal_at_mail_names_the_domain(upstreams: tuple[UpstreamConfig | MailgunApiConfig,
                                                           ...],
                                          sender: str, reply: Reply | None) -> None:
    """553 5.7.1 naming the domain when no upstream carries it; none with no upstreams."""
    assert refusal(upstreams, sender) == reply


def down(until: float) -> Gate:
    return Gate(Breaker(Circuit.OPEN, 1, until, "refused"))


@pytest.mark.parametrize("path, gates, upstream, wait, why", [
    ((MG, ANY), {}, "mg", 0.0, ""),
    ((MG, ANY), {"mg": down(T0 + 30)}, "any", 0.0, ""),
    ((MG, ANY), {"mg": down(T0 - 1)}, "mg", 0.0, ""),
    ((MG, ANY), {"mg": down(T0 + 30), "any": down(T0 + 20)}, None, 20.0,
     "every upstream of its route is down"),
    ((PACED, ANY), {"paced": Gate(bucket=Bucket().take(Rate(10, 1.0), T0))}, None, 0.1,
     "waiting for rate (paced)"),
    ((MG, ANY), {"mg": Gate(bucket=Bucket(paused_until=T0 + 60))}, None, 60.0,
     "waiting for rate (mg)"),
    ((), {}, None, 0.0, "no upstream relays mail from this sender"),
])
def test_choose_takes_the_first_upstream_that_is_up(
        path: tuple[UpstreamConfig | MailgunApiConfig, ...], gates: dict[str, Gate],
        upstream: str | None, wait: float, why: str) -> None:
    """Down upstreams are passed over; a rate is waited for, not failed over."""
    choice = choose(path, gates, T0, GRACE)
    assert (choice.upstream.name if choice.upstream else None) == upstream
    assert choice.wait == pytest.approx(wait) and choice.why == why


def test_choosing_an_upstream_takes_its_token_and_starts_its_probe() -> None:
    """The chosen upstream's gate comes back updated, to be stored by the caller."""
    choice = choose((PACED,), {"paced": down(T0 - 1)}, T0, GRACE)
    assert choice.gate is not None and choice.gate.breaker.circuit is Circuit.HALF_OPEN
    assert choice.gate.bucket.wait(PACED.rate, T0) == pytest.approx(0.1)


@pytest.mark.parametrize("attempt, reaction", [
    (SENT, Reaction.SETTLE),
    (AttemptResult("mg", error=Reply(550, "5.1.1 No such user"), stage=Stage.MAIL),
     Reaction.SETTLE),
    (AttemptResult("mg", error=Reply(None, "connection failed: refused")), Reaction.FAILOVER),
    (AttemptResult("mg", error=Reply(535, "5.7.8 bad credentials"), stage=Stage.AUTH),
     Reaction.FAILOVER),
    (AttemptResult("mg", error=Reply(421, "4.7.0 rate limited")), Reaction.REQUEUE),
    (AttemptResult("mg", error=Reply(451, "4.7.0 Mailgun API HTTP 429: slow down"),
                   stage=Stage.SESSION), Reaction.REQUEUE),
])
def test_what_follows_an_attempt(attempt: AttemptResult, reaction: Reaction) -> None:
    """Upstream failures fail over, rate limits requeue, everything else is settled."""
    assert react(Gate(), attempt, T0, CONFIG, 0.5)[1] is reaction


def test_a_failure_marks_the_upstream_down() -> None:
    gate, _ = react(Gate(), AttemptResult("mg", error=Reply(None, "refused")), T0, CONFIG, 0.5)
    assert gate.breaker.circuit is Circuit.OPEN and gate.breaker.reason == "refused"


def test_a_rate_limit_pauses_the_upstream_for_retry_min() -> None:
    gate, _ = react(Gate(), AttemptResult("mg", error=Reply(421, "4.7.0 slow down")), T0,
                    CONFIG, 0.5)
    assert gate.bucket.wait(None, T0) == CONFIG.retry_min


@pytest.mark.parametrize("attempt", [
    SENT, AttemptResult("mg", error=Reply(421, "4.7.0 slow down")),
    AttemptResult("mg", error=Reply(550, "5.1.1 No such user"), stage=Stage.RCPT),
])
def test_any_answer_of_a_working_upstream_closes_its_circuit(attempt: AttemptResult) -> None:
    """A probe that reaches the server closes the circuit, whatever it says of the message."""
    probing = Gate(Breaker(Circuit.HALF_OPEN, 2, T0 + GRACE, "refused"))
    gate, _ = react(probing, attempt, T0, CONFIG, 0.5)
    assert gate.breaker == Breaker()
