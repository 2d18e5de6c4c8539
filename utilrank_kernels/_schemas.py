"""The JSON files the package reads back, as pydantic models: the fields each holds, their types and ranges.

``_files.read_json(path, kind)`` reads a file through one of these (``SCHEMAS[kind]``) and raises ``SchemaError``
naming the file and the first field that is wrong (``PATH: field layers[blocks.0.fc1].rank: expected >= 1, got 0``).
Types are strict: valid JSON of the wrong type (a list for an object, ``"rank": true``, ``"dense": 5``) is refused,
not coerced.
Fields a newer writer adds are kept (``extra="allow"``), so a reader checks what it uses and passes the rest on.
The formats themselves are docs/design.md's table (§2)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

# the value types of the fields, with their ranges
Count = Annotated[int, Field(ge=0)]  # a number of things: >= 0 (an int, never a bool: the models are strict)
Positive = Annotated[int, Field(ge=1)]  # a rank, a size, a batch: >= 1
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # an energy, a size target: in (0, 1]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # a utilization, an MLU: in [0, 1]
Millis = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a time in ms
Finite = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
LayerKind = Literal["linear", "conv2d"]
Method = Literal["optimal", "data", "svd"]


class _File(BaseModel):
    """A file's top level: strict types, unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())


class _Part(BaseModel):
    """A nested object: strict types, unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())


# ---- plan.json (compress/plan.py) ----
class PlanLatency(_Part):
    device: str
    batch: Positive
    dense_ms: Millis
    factored_ms: Millis


class PlanLayer(_Part):
    kind: LayerKind
    rank: Positive
    k_in: Positive | None = None
    k_out: Positive | None = None
    energy: Fraction | None = None
    reason: str = ""
    latency: PlanLatency | None = None


class PlanTarget(_Part):
    device: Literal["cpu", "cuda"]
    batch: Positive


class PlanFile(_File):
    format: Literal["utilrank.plan/1"]
    arch: str = ""
    method: Method = "data"  # plans written before the method was recorded projected on the data subspaces
    layers: dict[str, PlanLayer]
    dense: dict[str, str] = {}
    # meta the planners write (free-form otherwise)
    energy: Fraction | None = None
    tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    total_tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    target_params: Fraction | None = None
    target_flops: Fraction | None = None
    target: PlanTarget | None = None


# ---- config.json of a compressed folder (compress/io.py) ----
class ModelInput(_Part):
    """What the model takes and how its data was prepared (``config.json``'s ``input``)."""

    kind: Literal["image", "text"]
    names: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    size: Annotated[list[Positive], Field(min_length=3, max_length=3)] | None = None  # image: [C, H, W]
    mean: list[Finite] | None = None
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = None
    interpolation: str | None = None
    max_length: Positive | None = None  # text: tokens per example
    vocab_size: Positive | None = None
    pad_token_id: Count | None = None
    preprocessing: str | None = None  # digits | timm | the folder of tokenizer / image-processor files
    files: list[str] = []


class CompressedConfig(_File):
    format: Literal["utilrank.config/1"]
    arch: Annotated[str, Field(min_length=1)]
    source: Literal["builtin", "timm", "torchvision", "hf"] | None = None
    model_kwargs: dict[str, Any] = {}
    num_classes: Positive | None = None
    head_reset: bool = False
    task: str | None = None
    hf_config: dict[str, Any] | None = None
    hf_dir: str | None = None
    conv1d_as_linear: list[str] = []  # transformers Conv1D layers stored as nn.Linear (models/hf.py)
    input: ModelInput | None = None


# ---- manifest.json (_folder.py) ----
class ManifestEntry(_Part):
    bytes: Count
    sha256: Sha256


class ManifestFile(_File):
    format: Literal["utilrank.manifest/1"]
    command: str
    argv: list[str] = []
    version: str = ""
    date: str = ""
    files: dict[str, ManifestEntry]


# ---- report.json (analysis/report.py) ----
class ReportLayer(_Part):
    name: str
    kind: LayerKind
    in_features: Positive
    out_features: Positive
    kernel_size: list[Positive] | None = None
    k_in: Count
    k_out: Count
    rank: Count
    full_rank: Positive
    weight_rank: Count
    utilization: Unit
    params_dense: Count
    params_factored: Count
    samples: Count | None = None  # rows of input the statistics saw (tokens, a conv's output pixels)
    sample_bounded: bool | None = None  # samples < min(in, out): the utilized rank is at most the samples
    saved_rank: Positive | None = None


class Skipped(_Part):
    name: str
    reason: str


class ReportSaved(_Part):
    dense: Count
    compressed: Count


class ReportFile(_File):
    format: Literal["utilrank.report/1"]
    model: str
    dataset: str
    energy: Fraction
    tokens: Count
    mlu: Unit
    mlu_unbounded: Unit | None = None  # the MLU over the layers whose rank the samples do not bound
    layers: list[ReportLayer]
    skipped: list[Skipped] = []
    saved: ReportSaved | None = None


# ---- summary.json (compress/summary.py) ----
class SummaryEngine(_Part):
    dense_ms: Millis
    compressed_ms: Millis
    speedup: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    mode: str = ""  # the fastest row's engine and dtype


class SummaryVariant(_Part):
    params: Count | None = None
    flops: Count | None = None
    latency_ms: Millis | None = None


class SummaryTarget(_Part):
    measure: Literal["params", "flops"]
    fraction: Fraction
    achieved: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class SummaryFile(_File):
    format: Literal["utilrank.summary/1"]
    model: str
    dataset: str
    method: Method
    metric: str
    engines: dict[str, SummaryEngine] = {}
    dense: SummaryVariant
    projected: SummaryVariant
    compressed: SummaryVariant
    mlu: Unit | None = None
    finetune_epochs: Count = 0
    finetune_loss: Literal["", "labels", "logits", "embedding", "hidden"] = ""
    distill_temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    test_split: str = "test"
    latency_batch: Positive | None = None
    notes: list[str] = []
    warnings: list[str] = []
    dense_finetuned: SummaryVariant | None = None
    target: SummaryTarget | None = None


# ---- the statistics header (analysis/stats.py: safetensors metadata "utilrank") ----
class ConvGeometry(_Part):
    kernel_size: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    stride: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    padding: Annotated[list[Count], Field(min_length=2, max_length=2)] | Literal["same", "valid"]
    dilation: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    in_channels: Positive


class StatsLayer(_Part):
    kind: LayerKind
    in_features: Positive
    out_features: Positive
    conv: ConvGeometry | None = None


class StatsMeta(_Part):
    model: str | None = None
    dataset: str | None = None
    pass_: dict[str, Any] | None = Field(default=None, alias="pass")  # the pass identity a resume must match


class StatsHeader(_File):
    format: Literal["utilrank.stats/1"]
    batches: Count
    skipped: list[Skipped] = []
    meta: StatsMeta = StatsMeta()
    layers: dict[str, StatsLayer]


# ---- --label-map FILE (data/datasets.py): a class folder's name -> the index of a pretrained head's class ----
class LabelMap(RootModel[dict[str, Count]]):
    model_config = ConfigDict(strict=True)


# the schema of each kind of file, by the name ``_files.read_json`` is given
SCHEMAS: dict[str, type[BaseModel]] = {"plan": PlanFile, "config": CompressedConfig, "manifest": ManifestFile,
                                       "report": ReportFile, "summary": SummaryFile, "statistics": StatsHeader,
                                       "label_map": LabelMap}


class Invalid(ValueError):
    """A document its schema refuses: the first problem, in one line (``_files`` adds the file's name)."""


def validate(doc: Any, kind: str) -> dict:
    """``doc`` checked against ``SCHEMAS[kind]``: the document as written (the fields it holds, none added), or
    ``Invalid`` naming the first field that is wrong."""
    schema = SCHEMAS[kind]
    try:
        return schema.model_validate(doc).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as exc:
        raise Invalid(_problem(exc, schema)) from None


_EXPECTED = {  # pydantic's words for JSON's
    "a valid dictionary": "an object", "a valid list": "an array", "a valid integer": "an integer",
    "a valid string": "a string", "a valid number": "a number", "a valid boolean": "true or false",
    "greater than or equal to": ">=", "greater than": ">", "less than or equal to": "<=", "less than": "<",
}


def _problem(exc: ValidationError, schema: type[BaseModel]) -> str:
    """The first problem pydantic found, in one line: ``field a.b: expected ..., got ...`` (and how many more); a
    file of another format first of all: ``not a utilrank.plan/1 file``."""
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if tuple(e["loc"]) == ("format",)), errors[0])
    # "[key]" marks a dict key; "list[...]", "literal['a']" name the member of a union that was tried
    loc = [part for part in first["loc"] if not (isinstance(part, str) and ("[" in part or "'" in part))]
    field = _field_name(loc)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    kind, ctx = first["type"], first.get("ctx") or {}
    if loc == ["format"] and "format" in schema.model_fields:
        wanted = " or ".join(get_args(schema.model_fields["format"].annotation))
        return f"not a {wanted} file (" + ("no format field" if kind == "missing" else
                                           f"format {_shown(first['input'])}") + ")"
    if kind == "missing":
        return f"field {field}: missing{more}"
    if kind in ("model_type", "dict_type"):
        expected = "an object"
    elif kind == "string_pattern_mismatch":
        expected = f"a string matching {ctx['pattern']}"
    elif kind == "string_too_short" and ctx.get("min_length") == 1:
        expected = "a non-empty string"
    elif kind in ("too_short", "too_long", "string_too_short"):
        expected = first["msg"].split(" should have ", 1)[-1].split(" after validation")[0]
    else:
        expected = first["msg"].removeprefix("Input should be ")
        for words, json_words in _EXPECTED.items():
            expected = expected.replace(words, json_words)
    where = f"field {field}: " if loc else ""
    return f"{where}expected {expected}, got {_shown(first['input'])}{more}"


def _field_name(loc: list) -> str:
    """``layers[blocks.0.fc1].rank``: a dotted path, with keys that hold dots (layer names) and indices bracketed."""
    out = ""
    for part in loc:
        if isinstance(part, int) or not str(part).isidentifier():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _shown(value: Any) -> str:
    """A value as JSON writes it (short), with its kind where it is a container."""
    kind = {dict: "an object ", list: "an array "}.get(type(value), "")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return kind + (text if len(text) <= 60 else text[:57] + "...")
