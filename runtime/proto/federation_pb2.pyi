from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAIN: _ClassVar[SecAggStep]
    ADVERTISE: _ClassVar[SecAggStep]
    SHARE_KEYS: _ClassVar[SecAggStep]
    MASKED_INPUT: _ClassVar[SecAggStep]
    UNMASK_SHARES: _ClassVar[SecAggStep]
PLAIN: SecAggStep
ADVERTISE: SecAggStep
SHARE_KEYS: SecAggStep
MASKED_INPUT: SecAggStep
UNMASK_SHARES: SecAggStep

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "total_bytes", "sha256")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    sha256: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("site", "protocol_version", "rows")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    site: str
    protocol_version: str
    rows: int
    def __init__(self, site: _Optional[str] = ..., protocol_version: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("accepted", "reason", "run_id", "job_json")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_JSON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    run_id: str
    job_json: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., run_id: _Optional[str] = ..., job_json: _Optional[str] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("run_id", "site", "wait_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    site: str
    wait_seconds: int
    def __init__(self, run_id: _Optional[str] = ..., site: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "run_id", "round", "num_epochs", "manifest", "last_contribution", "attempt", "secure_aggregation")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[TaskHeader.Kind]
        TRAIN: _ClassVar[TaskHeader.Kind]
        FINISHED: _ClassVar[TaskHeader.Kind]
        SECAGG_SHARE_KEYS: _ClassVar[TaskHeader.Kind]
        SECAGG_MASKED_INPUT: _ClassVar[TaskHeader.Kind]
        SECAGG_UNMASK: _ClassVar[TaskHeader.Kind]
        DESCRIBE: _ClassVar[TaskHeader.Kind]
    WAIT: TaskHeader.Kind
    TRAIN: TaskHeader.Kind
    FINISHED: TaskHeader.Kind
    SECAGG_SHARE_KEYS: TaskHeader.Kind
    SECAGG_MASKED_INPUT: TaskHeader.Kind
    SECAGG_UNMASK: TaskHeader.Kind
    DESCRIBE: TaskHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    kind: TaskHeader.Kind
    run_id: str
    round: int
    num_epochs: int
    manifest: Manifest
    last_contribution: int
    attempt: int
    secure_aggregation: bool
    def __init__(self, kind: _Optional[_Union[TaskHeader.Kind, str]] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., num_epochs: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., last_contribution: _Optional[int] = ..., attempt: _Optional[int] = ..., secure_aggregation: _Optional[bool] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round", "site", "weight", "manifest", "metrics", "attempt", "secagg_step", "refusal", "audit_head")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SECAGG_STEP_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    site: str
    weight: float
    manifest: Manifest
    metrics: _containers.ScalarMap[str, float]
    attempt: int
    secagg_step: SecAggStep
    refusal: str
    audit_head: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., weight: _Optional[float] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., attempt: _Optional[int] = ..., secagg_step: _Optional[_Union[SecAggStep, str]] = ..., refusal: _Optional[str] = ..., audit_head: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "reason", "audit_head")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    audit_head: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., audit_head: _Optional[str] = ...) -> None: ...
