"""Fuzzing GenerateRequest and ScoreRequest: every input is answered OK or INVALID_ARGUMENT.

Hypothesis builds GenerateRequest protobufs directly (every field, valid and wild
values, unset optionals) and sends them to the session server through Generate or
GenerateStream. Any other status (INTERNAL, DEADLINE_EXCEEDED, UNAVAILABLE, ...)
fails with the request printed, and after every example the server must still be
alive and SERVING. A last test checks the server drained and counted no INTERNAL.
Generation work is kept small (max_tokens mostly 1-4) so this runs in about a minute.
"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fusion_client import fusion_pb2

MEMBERS = ("alpha", "beta")  # the conftest ensemble (checked against GetEnsemble below)
POLICIES = (
    "mean",
    "product",
    "max",
    "entropy",
    "vote",
    "contrastive",
    "proxy",
    "gate",
    "packllm",
)
PARAM_NAMES = ("tau", "alpha", "beta", "smoothing", "min_entropy", "temperature")
ROLE_NAMES = ("primary", "expert", "amateur", "base", "anti")
RPC_TIMEOUT_S = 20.0
ALLOWED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)

# Text without ':' for random policy names: "module:Class" makes the server import
# the module, and a random one must not happen to be a real module with side effects.
odd_text = st.text(max_size=24)
long_text = st.text(min_size=129, max_size=400)
name_text = st.text(alphabet=st.characters(exclude_characters=":"), max_size=12)

nasty_floats = st.sampled_from(
    [
        0.0,
        -0.0,
        -1.0,
        1.0,
        0.5,
        1e-9,
        5e-324,  # smallest subnormal
        2.2250738585072014e-308,
        1e308,
        1.7976931348623157e308,
        -1e308,
        math.nan,
        math.inf,
        -math.inf,
    ]
)
any_float = st.one_of(nasty_floats, st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2))

prompts = st.one_of(
    st.just(""),
    st.just("\x00"),
    st.sampled_from(["def f():", "import os\n", "x = 1", " ", "\n\n", "\ufeff", "🙂"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).map(
        lambda s: s + "\x00" + s
    ),
    # Long: mostly above the members' 256-token context (INVALID_ARGUMENT), cheap.
    st.integers(200, 3000).map(lambda n: ("x = 1\n" * (n // 6 + 1))[:n]),
    st.text(min_size=300, max_size=3000),
)
request_ids = st.one_of(st.just(""), odd_text, long_text, st.just("r" * 128), st.just("r" * 129))
max_tokens = st.one_of(
    st.none(),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from([0, 512, 513, 600, 2**32 - 1]),
    st.integers(0, 600),
)
optional_floats = st.one_of(st.none(), any_float)
top_ks = st.one_of(st.just(0), st.integers(1, 40), st.sampled_from([2**31, 2**32 - 1]))
top_ks = st.one_of(top_ks, st.integers(0, 2**32 - 1))
seeds = st.one_of(st.none(), st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
seeds = st.one_of(seeds, st.integers(0, 2**64 - 1))
stops = st.one_of(
    st.just([]),
    st.lists(st.text(min_size=1, max_size=4), max_size=3),
    st.lists(st.text(max_size=8), max_size=20),
)
policies = st.one_of(
    st.just(""),
    st.sampled_from(POLICIES),
    st.sampled_from(POLICIES),
    name_text,
    st.sampled_from(["no_such_module:Nope", ":", "math:pi", "fusion_server:nothing", "a:b:c"]),
)
member_keys = st.one_of(st.sampled_from(MEMBERS), st.sampled_from(MEMBERS), name_text)
weights = st.dictionaries(member_keys, any_float, max_size=3)
params = st.dictionaries(
    st.one_of(st.sampled_from(PARAM_NAMES), st.sampled_from(PARAM_NAMES), name_text),
    any_float,
    max_size=3,
)
roles = st.dictionaries(
    member_keys,
    st.one_of(st.sampled_from(ROLE_NAMES), st.sampled_from(ROLE_NAMES), odd_text),
    max_size=3,
)
logprobs = st.one_of(st.just(0), st.integers(0, 50))


# Per policy: its params' valid ranges, and role assignments it accepts.
PARAM_RANGES = {
    "entropy": {"min_entropy": (1e-6, 10.0)},
    "vote": {"smoothing": (1e-9, 1.0)},
    "contrastive": {"alpha": (0.0, 1.0), "beta": (0.0, 10.0)},
    "proxy": {"alpha": (-10.0, 10.0)},
    "gate": {"tau": (0.0, 2.0)},
    "packllm": {"temperature": (0.01, 100.0)},
}
VALID_ROLES = {
    "gate": [{"alpha": "primary"}, {"beta": "primary"}],
    "contrastive": [{"alpha": "expert", "beta": "amateur"}, {"beta": "expert", "alpha": "amateur"}],
    "proxy": [
        {"alpha": "base", "beta": "expert"},
        {"beta": "base", "alpha": "expert"},
        {"alpha": "base", "beta": "anti"},
    ],
}


@st.composite
def tame_fusion(draw) -> fusion_pb2.FusionParams:
    """A fusion block the server should accept: consistent policy, params and roles."""
    policy = draw(st.sampled_from(POLICIES))
    ranges = PARAM_RANGES.get(policy, {})
    chosen = draw(st.lists(st.sampled_from(sorted(ranges)), unique=True)) if ranges else []
    params = {name: draw(st.floats(*ranges[name])) for name in chosen}
    roles = draw(st.sampled_from(VALID_ROLES[policy])) if policy in VALID_ROLES else {}
    w = st.one_of(st.just(0.0), st.floats(1e-300, 1e300), st.floats(0.01, 10))
    weights = draw(st.dictionaries(st.sampled_from(MEMBERS), w, max_size=2))
    if weights and not any(weights.values()) and len(weights) == len(MEMBERS):
        weights[MEMBERS[0]] = 1.0
    return fusion_pb2.FusionParams(policy=policy, weights=weights, params=params, roles=roles)


TAME = {
    "request_id": st.one_of(st.just(""), st.text(max_size=32)),
    "prompt": st.one_of(
        st.sampled_from(["def f():", "import os\n", "x = 1", " ", "\x00", "🙂"]),
        st.text(min_size=1, max_size=60),
    ),
    "max_tokens": st.one_of(st.none(), st.integers(1, 4), st.integers(1, 4), st.integers(1, 24)),
    "temperature": st.one_of(st.none(), st.just(0.0), st.floats(0, 2), st.floats(0, 1e6)),
    "top_p": st.one_of(st.none(), st.just(1.0), st.floats(1e-300, 1.0, exclude_min=True)),
    "top_k": st.one_of(st.just(0), st.integers(1, 40), st.integers(0, 2**32 - 1)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=16),
    "ignore_eos": st.booleans(),
    "fusion": tame_fusion(),
    "logprobs": st.integers(0, 20),
    "member_details": st.booleans(),
}
WILD = {
    "request_id": request_ids,
    "prompt": prompts,
    "max_tokens": max_tokens,
    "temperature": optional_floats,
    "top_p": optional_floats,
    "top_k": top_ks,
    "seed": seeds,
    "stop": stops,
    "ignore_eos": st.booleans(),
    "fusion": st.builds(
        fusion_pb2.FusionParams, policy=policies, weights=weights, params=params, roles=roles
    ),
    "logprobs": logprobs,
    "member_details": st.booleans(),
}


@st.composite
def requests(draw) -> fusion_pb2.GenerateRequest:
    """Tame requests (mostly accepted), ones with a single wild field, and all-wild ones,
    so that both the validation and the generation paths are exercised."""
    mode = draw(st.sampled_from(["tame", "one_wild", "wild", "tame", "one_wild"]))
    wild_fields = set(WILD) if mode == "wild" else set()
    if mode == "one_wild":
        wild_fields = {draw(st.sampled_from(sorted(WILD)))}
    f = {name: draw((WILD if name in wild_fields else TAME)[name]) for name in TAME}
    sampling = fusion_pb2.SamplingParams(
        max_tokens=f["max_tokens"],
        temperature=f["temperature"],
        top_p=f["top_p"],
        top_k=f["top_k"],
        seed=f["seed"],
        stop=f["stop"],
        ignore_eos=f["ignore_eos"],
    )
    output = fusion_pb2.OutputOptions(logprobs=f["logprobs"], member_details=f["member_details"])
    return fusion_pb2.GenerateRequest(
        request_id=f["request_id"],
        prompt=f["prompt"],
        sampling=sampling,
        fusion=f["fusion"],
        output=output,
    )


def _call(client, rpc: str, request: fusion_pb2.GenerateRequest):
    """(status code, details, messages) of one call."""
    try:
        if rpc == "Generate":
            messages = [client.stub.Generate(request, timeout=RPC_TIMEOUT_S)]
        else:
            messages = list(client.stub.GenerateStream(request, timeout=RPC_TIMEOUT_S))
    except grpc.RpcError as err:
        return err.code(), err.details(), []
    return grpc.StatusCode.OK, "", messages


def test_fuzz_ensemble_is_the_expected_one(client):
    assert tuple(m.name for m in client.get_ensemble().members) == MEMBERS


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(request=requests())
def test_fuzz_generate_request_is_ok_or_invalid_argument(server, client, request):
    # Alternate the RPCs by a property of the request itself, so a replayed
    # (or shrunk) example always goes through the same RPC.
    rpc = ("Generate", "GenerateStream")[request.ByteSize() % 2]
    code, details, messages = _call(client, rpc, request)
    alive = server.proc.poll() is None
    assert alive, f"server died on {rpc}({request!r}); see {server.log}"
    assert code in ALLOWED, (
        f"{rpc} -> {code.name}: {details}\nrequest: {request!r}\nlog: {server.log}"
    )
    event(f"{rpc} {code.name}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        event(f"rejected on {details.split(':', 1)[0].split('.')[0]}")
        assert details, f"INVALID_ARGUMENT without a message for {request!r}"
    else:
        last = messages[-1]
        assert last.finish_reason != fusion_pb2.FINISH_REASON_UNSPECIFIED, request
        limit = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        assert last.usage.completion_tokens <= limit, request
        if request.request_id:
            assert all(m.request_id == request.request_id for m in messages), request
    assert client.health(timeout=10) == "SERVING", f"not SERVING after {rpc}({request!r})"


@st.composite
def score_requests(draw) -> fusion_pb2.ScoreRequest:
    """Score requests: tame (mostly accepted) or with wild fields, as for Generate."""
    wild = draw(st.booleans())
    table = WILD if wild else TAME
    continuation = draw(
        st.one_of(st.just(""), st.sampled_from(["    return 1\n", "🙂", "\x00"]), table["prompt"])
    )
    return fusion_pb2.ScoreRequest(
        request_id=draw(table["request_id"]),
        prompt=draw(table["prompt"]),
        continuation=continuation,
        fusion=draw(table["fusion"]),
        token_details=draw(st.booleans()),
    )


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=score_requests())
def test_fuzz_score_request_is_ok_or_invalid_argument(server, client, request):
    try:
        reply = client.stub.Score(request, timeout=RPC_TIMEOUT_S)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details, reply = err.code(), err.details(), None
    assert server.proc.poll() is None, f"server died on Score({request!r}); see {server.log}"
    assert code in ALLOWED, (
        f"Score -> {code.name}: {details}\nrequest: {request!r}\nlog: {server.log}"
    )
    event(f"Score {code.name}")
    if reply is not None:
        assert math.isfinite(reply.logprob) and reply.logprob <= 1e-9, request
        assert [m.member for m in reply.members] == list(MEMBERS)
    assert client.health(timeout=10) == "SERVING", f"not SERVING after Score({request!r})"


def test_fuzz_left_the_server_drained_without_internal_errors(server):
    # Runs after the fuzz test (file order): nothing still running, no INTERNAL counted.
    metrics = server.wait_drained()
    busy = {
        k: v
        for k, v in metrics.items()
        if k.startswith(("fusion_member_engine_requests", "fusion_running_requests")) and v
    }
    assert not busy, busy
    internal = {k: v for k, v in metrics.items() if 'code="INTERNAL"' in k and v}
    assert not internal, f"{internal}; see {server.log}"
    assert server.proc.poll() is None


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
