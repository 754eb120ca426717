from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class FusionParams(_message.Message):
    __slots__ = ("policy", "weights", "params", "roles")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RolesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    policy: str
    weights: _containers.ScalarMap[str, float]
    params: _containers.ScalarMap[str, float]
    roles: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., params: _Optional[_Mapping[str, float]] = ..., roles: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("logprobs", "member_details")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_DETAILS_FIELD_NUMBER: _ClassVar[int]
    logprobs: int
    member_details: bool
    def __init__(self, logprobs: _Optional[int] = ..., member_details: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "sampling", "fusion", "output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    sampling: SamplingParams
    fusion: FusionParams
    output: OutputOptions
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., fusion: _Optional[_Union[FusionParams, _Mapping]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class MemberTokenDetail(_message.Message):
    __slots__ = ("member", "logprob", "top_token_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    member: str
    logprob: float
    top_token_id: int
    def __init__(self, member: _Optional[str] = ..., logprob: _Optional[float] = ..., top_token_id: _Optional[int] = ...) -> None: ...

class MemberStats(_message.Message):
    __slots__ = ("member", "consulted_steps", "top1_agreement")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    CONSULTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    member: str
    consulted_steps: int
    top1_agreement: float
    def __init__(self, member: _Optional[str] = ..., consulted_steps: _Optional[int] = ..., top1_agreement: _Optional[float] = ...) -> None: ...

class FusionStats(_message.Message):
    __slots__ = ("fused_steps", "primary_only_steps", "members", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FUSED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ONLY_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    fused_steps: int
    primary_only_steps: int
    members: _containers.RepeatedCompositeFieldContainer[MemberStats]
    weights: _containers.ScalarMap[str, float]
    def __init__(self, fused_steps: _Optional[int] = ..., primary_only_steps: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberStats, _Mapping]]] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TokenDetail(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "top_logprobs", "members")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    members: _containers.RepeatedCompositeFieldContainer[MemberTokenDetail]
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., members: _Optional[_Iterable[_Union[MemberTokenDetail, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "usage", "tokens", "fusion_stats", "members")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FUSION_STATS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    tokens: _containers.RepeatedCompositeFieldContainer[TokenDetail]
    fusion_stats: FusionStats
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[TokenDetail, _Mapping]]] = ..., fusion_stats: _Optional[_Union[FusionStats, _Mapping]] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "usage", "tokens", "fusion_stats", "members")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FUSION_STATS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    tokens: _containers.RepeatedCompositeFieldContainer[TokenDetail]
    fusion_stats: FusionStats
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[TokenDetail, _Mapping]]] = ..., fusion_stats: _Optional[_Union[FusionStats, _Mapping]] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEnsembleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberInfo(_message.Message):
    __slots__ = ("name", "model", "weight", "vocab_size", "tokenizer_fingerprint", "tokenizer_kind", "max_model_len")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    weight: float
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_kind: str
    max_model_len: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., weight: _Optional[float] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., tokenizer_kind: _Optional[str] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class PolicyParamInfo(_message.Message):
    __slots__ = ("name", "default", "min", "max", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    default: float
    min: float
    max: float
    description: str
    def __init__(self, name: _Optional[str] = ..., default: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class PolicyRoleInfo(_message.Message):
    __slots__ = ("name", "description", "min_members", "max_members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    min_members: int
    max_members: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., min_members: _Optional[int] = ..., max_members: _Optional[int] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "params", "roles")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedCompositeFieldContainer[PolicyParamInfo]
    roles: _containers.RepeatedCompositeFieldContainer[PolicyRoleInfo]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[_Union[PolicyParamInfo, _Mapping]]] = ..., roles: _Optional[_Iterable[_Union[PolicyRoleInfo, _Mapping]]] = ...) -> None: ...

class GetEnsembleResponse(_message.Message):
    __slots__ = ("members", "default_policy", "policies", "alignment", "top_k", "max_tokens_limit", "default_max_tokens")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[MemberInfo]
    default_policy: str
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    alignment: str
    top_k: int
    max_tokens_limit: int
    default_max_tokens: int
    def __init__(self, members: _Optional[_Iterable[_Union[MemberInfo, _Mapping]]] = ..., default_policy: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ..., alignment: _Optional[str] = ..., top_k: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., default_max_tokens: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "continuation", "fusion", "token_details")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DETAILS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    continuation: str
    fusion: FusionParams
    token_details: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., continuation: _Optional[str] = ..., fusion: _Optional[_Union[FusionParams, _Mapping]] = ..., token_details: _Optional[bool] = ...) -> None: ...

class MemberScore(_message.Message):
    __slots__ = ("member", "logprob", "bits_per_byte", "tokens")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    member: str
    logprob: float
    bits_per_byte: float
    tokens: int
    def __init__(self, member: _Optional[str] = ..., logprob: _Optional[float] = ..., bits_per_byte: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class ScoreToken(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "member_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MEMBER_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    member_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., member_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "logprob", "bits_per_byte", "bytes", "tokens", "prompt_tokens", "members", "policy", "weights", "token_details")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DETAILS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    logprob: float
    bits_per_byte: float
    bytes: int
    tokens: int
    prompt_tokens: int
    members: _containers.RepeatedCompositeFieldContainer[MemberScore]
    policy: str
    weights: _containers.ScalarMap[str, float]
    token_details: _containers.RepeatedCompositeFieldContainer[ScoreToken]
    def __init__(self, request_id: _Optional[str] = ..., logprob: _Optional[float] = ..., bits_per_byte: _Optional[float] = ..., bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberScore, _Mapping]]] = ..., policy: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., token_details: _Optional[_Iterable[_Union[ScoreToken, _Mapping]]] = ...) -> None: ...
