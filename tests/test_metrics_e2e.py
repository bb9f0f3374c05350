"""/metrics, /healthz and /readyz of the real daemon, checked against the sandbox and Redis."""

from __future__ import annotations

from collections import Counter

import aiohttp
import orjson
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from forwarder.sandbox import Sandbox
from tests.daemon_proc import StartDaemon, daemon_env
from tests.e2e import dead_export, envelope, push, wait_drained
from tests.servers import RedisServer, free_port

SITES = ["1001", "1002", "1003"]
TYPES = ["cart", "order", "product", "pageview"]
MALFORMED = [b"{not json", b"also not json", b'{"site_id":"1001","type":"basket","data":{}}', b"[]"]



def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Return the samples of one metric, keyed by their sorted labels."""
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                result[tuple(sorted(sample.labels.items()))] = sample.value
    return result


async def test_metrics_match_sandbox_and_dead_letters(
    redis_server: RedisServer, redis_client: aioredis.Redis, start_daemon: StartDaemon
) -> None:
    entries = [envelope(SITES[n % 3], TYPES[(n // 3) % 4], n) for n in range(240)]
    # Two events the API rejects one by one: a cart without its total, an order
    # with an unknown status. They become dead letters with reason "validation".
    invalid_cart = orjson.loads(envelope("1002", "cart", 1000))
    del invalid_cart["data"]["total"]
    invalid_order = orjson.loads(envelope("1003", "order", 1001))
    invalid_order["data"]["status"] = "canceled"
    entries += [orjson.dumps(invalid_cart), orjson.dumps(invalid_order), *MALFORMED]
    port = free_port()

    async with Sandbox(tokens={"token-default": set(SITES)}) as sandbox:
        env = daemon_env(redis_server.url, sandbox.base_url, batch_linger_ms=20,
                         metrics_listen=f"127.0.0.1:{port}")
        daemon = await start_daemon(env)
        await push(redis_client, entries)
        await sandbox.wait_for(lambda state: state.total_accepted >= 240, timeout=30)
        await wait_drained(redis_client)

        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.get("/metrics") as response:
                assert response.status == 200
                text = await response.text()
            async with session.get("/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
            async with session.get("/readyz") as response:
                assert response.status == 200
                assert await response.json() == {"ready": True, "problems": []}
        requests_seen = sandbox.state.total_requests
        accepted = dict(sandbox.state.accepted)
        assert await daemon.stop() == 0

    delivered = samples(text, "jirafe_forwarder_events_delivered_total")
    expected_delivered = {(("site", site), ("type", event_type)): float(count)
                          for (site, event_type), count in accepted.items()}
    assert delivered == expected_delivered
    assert sum(delivered.values()) == 240
    assert len(delivered) == len(SITES) * len(TYPES)

    dead = await dead_export(env)
    dead_by_reason = Counter(record["reason"] for record in dead)
    assert dead_by_reason == {"validation": 2, "invalid_json": 2, "unknown_type": 1, "not_an_object": 1}
    dead_metric: Counter[str] = Counter()
    for labels, value in samples(text, "jirafe_forwarder_events_dead_lettered_total").items():
        dead_metric[dict(labels)["reason"]] += int(value)
    assert dead_metric == dead_by_reason
    validation = samples(text, "jirafe_forwarder_events_dead_lettered_total")
    assert validation[(("reason", "validation"), ("site", "1002"), ("type", "cart"))] == 1
    assert validation[(("reason", "validation"), ("site", "1003"), ("type", "order"))] == 1

    requests = samples(text, "jirafe_forwarder_requests_total")
    assert sum(requests.values()) == requests_seen
    for site in SITES:
        assert requests[(("outcome", "ok"), ("site", site))] > 0
    received = samples(text, "jirafe_forwarder_events_received_total")
    assert sum(received.values()) == 242
    assert samples(text, "jirafe_forwarder_ready") == {(): 1.0}
    assert samples(text, "jirafe_forwarder_dead_letter_full") == {(): 0.0}
