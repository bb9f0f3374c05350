from __future__ import annotations

import orjson
import pytest

from forwarder.blocks import decode_block, encode_block
from forwarder.envelope import EnvelopeError, parse_envelope


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":{}', "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":{}} trailing', "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":{"a":NaN}}', "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":{"a":"\\ud800"}}', "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
        (b'{"site_id":"1","type":"cart","data":{"a":"\xff"}}', "invalid_utf8"),
        (b'{"site_id":"1","type":"cart","data":{"a":"\xed\xa0\x80"}}', "invalid_utf8"),
        (b"[1,2,3]", "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b"42", "not_an_object"),
        (b'{"type":"cart","data":{}}', "missing_field"),
        (b'{"site_id":"1","data":{}}', "missing_field"),
        (b'{"site_id":"1","type":"cart"}', "missing_field"),
        (b'{"site_id":"abc","type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":"","type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":-5,"type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":123456789012345678901234567890123,"type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":1.5,"type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":null,"type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":"\xd9\xa3","type":"cart","data":{}}', "invalid_site_id"),
        (b'{"site_id":"1","type":"basket","data":{}}', "unknown_type"),
        (b'{"site_id":"1","type":7,"data":{}}', "invalid_type"),
        (b'{"site_id":"1","type":"cart","data":[1]}', "invalid_data"),
        (b'{"site_id":"1","type":"cart","data":"x"}', "invalid_data"),
        (b'{"site_id":"1","type":"cart","data":null}', "invalid_data"),
        (b'{"site_id":"1","type":"cart","data":{},"id":[1]}', "invalid_envelope"),
    ],
)
def test_malformed_envelope_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(raw)
    assert caught.value.reason == reason


def test_envelope_fields_parsed() -> None:
    raw = b'{"id":"evt-9","site_id":"1234","type":"product.inventory","data":{"sku_code":"A","x":"\\"data\\":"}}'
    envelope = parse_envelope(raw)
    assert envelope.site_id == "1234"
    assert envelope.type == "product.inventory"
    assert envelope.event_id == "evt-9"
    assert envelope.lane == "1234:batch"


def test_integer_site_id_becomes_string() -> None:
    envelope = parse_envelope(b'{"site_id":1234,"type":"pageview","data":{"site":"1234"}}')
    assert envelope.site_id == "1234"
    assert envelope.lane == "1234:pageview"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"site_id":"1","type":"cart","data":{"a":1}}',
        b'{"site_id":"1","type":"cart","data" :  {"a":1}}',
        b'{"data":{"a":1},"site_id":"1","type":"cart"}',
        # "data": appears inside a string before the real key.
        b'{"id":"\\"data\\":{\\"a\\":2}","site_id":"1","type":"cart","data":{"a":1}}',
        '{"site_id":"1","type":"cart","data":{"name":"Café ☕ 𝄞","esc":"\\n\\u00e9"}}'.encode(),
    ],
)
def test_block_round_trip_keeps_envelope_bytes(raw: bytes) -> None:
    envelope = parse_envelope(raw)
    block = decode_block(encode_block([(envelope.type_index, raw, envelope.data_offset, envelope.data_length)]))
    [(type_index, envelope_bytes, offset, length)] = block.events()
    assert envelope_bytes == raw
    assert type_index == envelope.type_index
    assert orjson.loads(raw[offset : offset + length]) == orjson.loads(raw)["data"]
