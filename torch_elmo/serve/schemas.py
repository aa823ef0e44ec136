"""The request bodies of `elmo serve` (pydantic models, also the OpenAPI schemas at /docs) and
`parse_body`: raw bytes -> a validated model, or `ApiError` with ONE line that says what is wrong
(400: empty body, not UTF-8, malformed JSON, a lone surrogate escape; 422: wrong types or
values, naming the field)."""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ValidationError, field_validator, model_validator


class ApiError(Exception):
    """An HTTP answer other than 200: status, one-line message, extra headers; `error_id` for a
    500 (the log prints it too)."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None,
                 error_id: Optional[str] = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers, self.error_id = headers or {}, error_id


def json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def check_texts(v: Any) -> Union[str, list[str]]:
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(f"must be a string or a list of strings, got {json_type(v)}")
    if not v:
        raise ValueError("is an empty list: give at least one text")
    for i, t in enumerate(v):
        if not isinstance(t, str):
            raise ValueError(f"item {i} must be a string, got {json_type(t)}")
    return v


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. `model` is echoed back, not checked (one model per server);
    `dimensions` only as the model's own width."""
    input: Union[str, list[str]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None

    _input = field_validator("input", mode="before")(check_texts)


class EmbedRequest(BaseModel):
    """Token-level vectors: `input` (whitespace-tokenized strings) or `tokens` (token lists)."""
    input: Optional[Union[str, list[str]]] = None
    tokens: Optional[list[list[str]]] = None
    layers: Literal["all", "top", "average"] = "all"
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        return None if v is None else check_texts(v)

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of token lists"
                             + ("" if isinstance(v, list) else f", got {json_type(v)}"))
        for i, tokens in enumerate(v):
            if not isinstance(tokens, list):
                raise ValueError(f"item {i} must be a list of strings, got {json_type(tokens)}")
            for j, t in enumerate(tokens):
                if not isinstance(t, str):
                    raise ValueError(f"item {i}, token {j} must be a string, got {json_type(t)}")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if (self.input is None) == (self.tokens is None):
            raise ValueError("give either input (strings) or tokens (token lists)")
        return self


class PredictRequest(BaseModel):
    """Texts for a saved task model (whitespace-tokenized strings)."""
    input: Union[str, list[str]]

    _input = field_validator("input", mode="before")(check_texts)


def one_line(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{where}: {msg}" if where else msg) + more


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    if not raw:
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: "
                            f"{raw[e.start:e.start + 1]!r})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {json_type(obj)}")
    try:                          # a \ud800-style escape decodes to a lone surrogate: not text
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the JSON holds a lone surrogate escape ({e.object[e.start]!r}): "
                            f"not valid Unicode") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ApiError(422, one_line(e)) from None


def openapi_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its body itself: the model's schema at /docs."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}
