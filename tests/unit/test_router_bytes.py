"""The router under byte alignment, on fake members whose vocabularies differ."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from fakes import (
    BOS,
    E_ACUTE_BANG,
    EOS,
    HE,
    LLO_W,
    ORLD,
    SHI_TAIL,
    TABLE,
    TABLE_B,
    FakeMember,
    byte_id,
    make_ensemble,
    random_model,
    scripted_model,
)
from test_router import TIMEOUT, drive, make_request, sessions

from fusion_server.feeder import incomplete_tail
from fusion_server.router.request import FinishReason
from fusion_server.router.router import Router

TABLES = [TABLE, TABLE_B, TABLE]
X, Y, Z = byte_id("x"), byte_id("y"), byte_id("z")


@contextlib.asynccontextmanager
async def mixed_router(members, tables=TABLES, **fusion):
    router = Router(make_ensemble(members, tables=tables[: len(members)], **fusion), 64)
    assert router.alignment.name == "bytes"
    router.start()
    try:
        yield router
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)


def alone_greedy(member: FakeMember, prompt_ids: list[int], n: int) -> list[int]:
    """The member's own greedy ids when it is always fed its own choice."""
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(member.model(tuple(prompt_ids), tuple(out)))))
        if out[-1] == EOS:
            break
    return out


def spell(table, ids) -> bytes:
    return b"".join(table[i] for i in ids)


@pytest.mark.parametrize("m", [0, 1, 2])
async def test_all_weight_on_one_member_reproduces_it(m):
    members = [FakeMember(n, random_model(seed=i + 1), top_k=5) for i, n in enumerate("abc")]
    weights = {n: float(i == m) for i, n in enumerate("abc")}
    async with mixed_router(members) as router:
        out = await drive(
            router, make_request(router, "Once", weights=weights, max_tokens=12, logprobs=1)
        )
    assert out.error is None
    prompt = router.ensemble.encode_members("Once")[m]
    expected = alone_greedy(members[m], prompt, 12)
    assert out.tokens == expected
    data = spell(TABLES[m], expected)
    assert out.text == data.decode("utf-8", "replace")
    fed = spell(TABLES[m], expected[:-1])  # the last choice is not fed (length)
    for j, s in enumerate(sessions(members, out.request)):
        if j == m:
            assert s.generated == tuple(expected[:-1])
        else:  # the others got their own encoding of the same bytes, partial chars held
            assert spell(TABLES[j], s.generated) == fed[: len(fed) - incomplete_tail(fed)]


async def test_a_split_character_is_held_by_the_other_member():
    script = [HE, LLO_W, ORLD, 0xE4, SHI_TAIL, E_ACUTE_BANG]
    members = [
        FakeMember("a", scripted_model([X] * 20, seed=1)),
        FakeMember("b", scripted_model(script, seed=2)),
    ]
    async with mixed_router(members) as router:
        out = await drive(
            router, make_request(router, weights={"a": 0, "b": 1}, max_tokens=20, logprobs=1)
        )
    assert out.finish is FinishReason.EOS
    assert out.tokens == [*script, EOS]
    assert out.text == "hello world世é!"
    assert [d.text for d in out.deltas] == ["he", "llo w", "orld", "", "世", "é!", ""]
    a, b = sessions(members, out.request)
    assert b.chunks[1:] == [[t] for t in script]
    assert a.chunks[1:] == [
        list(b"he"),
        list(b"llo w"),
        list(b"orld"),
        list("世".encode()),
        list("é!".encode()),
    ]


async def test_a_special_token_feeds_only_the_members_reporting_it():
    members = [
        FakeMember("a", scripted_model([X] * 20, seed=1), top_k=1),  # never reports BOS
        FakeMember("b", scripted_model([X, BOS, Y], seed=2)),
    ]
    async with mixed_router(members) as router:
        out = await drive(
            router, make_request(router, weights={"a": 0, "b": 1}, max_tokens=20, logprobs=1)
        )
    assert out.tokens == [X, BOS, Y, EOS]
    assert out.text == "xy"
    a, b = sessions(members, out.request)
    assert b.chunks[1:] == [[X], [BOS], [Y]]
    assert a.chunks[1:] == [[X], [Y]]  # not stepped while it had nothing new


@pytest.mark.parametrize(
    ("eos", "weights", "text"),
    [
        ("any", {"a": 1, "b": 1}, "xy"),  # a's top-1 is EOS after "xy"
        ("any", {"a": 0, "b": 1}, "xyz"),  # a has no say
        ("primary", {"a": 1, "b": 1}, "xy"),  # member 0 is a
    ],
)
async def test_eos_modes(eos, weights, text):
    members = [
        FakeMember("a", scripted_model([X, Y], seed=1)),
        FakeMember("b", scripted_model([X, Y, Z], seed=2)),
    ]
    async with mixed_router(members, eos=eos) as router:
        out = await drive(router, make_request(router, weights=weights, max_tokens=20))
    assert out.finish is FinishReason.EOS
    assert out.text == text


async def test_a_member_context_overflow_ends_with_length():
    members = [
        FakeMember("a", scripted_model([X] * 20, seed=1), max_model_len=5 + 8),
        FakeMember("b", scripted_model([HE, LLO_W, ORLD, X, X], seed=2)),
    ]
    async with mixed_router(members) as router:
        request = make_request(router, "Once", weights={"a": 0, "b": 1}, max_tokens=20)
        out = await drive(router, request)
    # a's context: BOS + "Once" (5) + "he" + "llo w" = 12; "orld" would make it 16 >= 13
    assert out.finish is FinishReason.LENGTH
    assert out.text == "hello world"


async def test_gate_primary_alone_skips_the_others():
    members = [FakeMember(n, random_model(seed=i + 1), top_k=5) for i, n in enumerate("ab")]
    async with mixed_router(members) as router:
        request = make_request(router, policy="gate", max_tokens=10, logprobs=1)
        request.roles = router.policy("gate").validate_roles(["a", "b"], {"b": "primary"})
        request.policy_params = {"tau": 0.0}  # always confident: b decides alone
        out = await drive(router, request)
    expected = alone_greedy(members[1], router.ensemble.encode_members("Once")[1], 10)
    assert out.tokens == expected
    a, _ = sessions(members, out.request)
    assert a.steps == 0  # never consulted: not even its prompt was sent


async def test_concurrent_requests_match_alone():
    members = [
        FakeMember(n, random_model(seed=i + 1), top_k=6, max_jitter=3) for i, n in enumerate("abc")
    ]
    prompts = [f"p{i} " + "é世"[: i % 3] for i in range(8)]

    async def one(router, i):
        kwargs = {"temperature": 0.9, "seed": i} if i % 2 else {}
        return (await drive(router, make_request(router, prompts[i], max_tokens=10, **kwargs))).text

    async with mixed_router(members) as router:
        alone = [await one(router, i) for i in range(8)]
        together = await asyncio.gather(*(one(router, i) for i in range(8)))
    assert together == alone


@pytest.mark.parametrize(("eos", "text"), [("fused", "xyz"), ("any", "xy"), ("primary", "xyz")])
async def test_eos_modes_on_shared_ids(eos, text):
    """The same rule on the shared-id path (b is member 0: its EOS comes after "xyz")."""
    members = [
        FakeMember("b", scripted_model([X, Y, Z], seed=2), weight=3.0),
        FakeMember("a", scripted_model([X, Y], seed=1)),
    ]
    router = Router(make_ensemble(members, eos=eos), 64)
    assert router.alignment.name == "shared-ids"
    router.start()
    try:
        out = await drive(router, make_request(router, max_tokens=20))
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)
    assert out.finish is FinishReason.EOS
    assert out.text == text


@pytest.mark.parametrize(("alignment", "expected"), [("auto", "shared-ids"), ("bytes", "bytes")])
async def test_identical_tables_share_ids_unless_forced(alignment, expected):
    script = [HE, LLO_W, X, BOS, Y]
    members = [FakeMember(n, scripted_model(script, seed=i)) for i, n in enumerate("ab")]
    ensemble = make_ensemble(members, tables=[TABLE_B, TABLE_B], alignment=alignment)
    assert ensemble.alignment == expected
    router = Router(ensemble, 64)
    assert router.alignment.name == expected
    router.start()
    try:
        out = await drive(router, make_request(router, max_tokens=20, logprobs=1))
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)
    assert out.tokens == [*script, EOS]  # both paths: the same tokens, the same feeding
    assert out.text == "hello wxy"
    for s in sessions(members, out.request):
        assert s.chunks[1:] == [[t] for t in script]
