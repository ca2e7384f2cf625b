"""The OpenAI request bodies the server accepts, and its error objects.

Bodies are parsed strictly (a string where a number belongs is an error, not a conversion);
fields of the OpenAI API that this server does not implement are ignored when they are at
their neutral value and refused otherwise, so a client never silently gets something else.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_LENGTH = 256  # characters per stop string
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class FieldError(ValueError):
    """A check of a whole request that fails on one field: the error's `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # extension, as in vLLM
    repetition_penalty: float = Field(default=1.0, gt=0)  # extension, as in vLLM
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)  # numpy's generators take no negative seed
    user: str | None = None
    # Not implemented; accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise FieldError(name, "not supported (use repetition_penalty)")
        if self.logprobs:
            raise FieldError("logprobs", "not supported")
        if self.logit_bias:
            raise FieldError("logit_bias", "not supported")
        stops = self.stop_list
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise FieldError(
                "stop", f"at most {MAX_STOP} strings of at most {MAX_STOP_LENGTH} characters"
            )
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise FieldError("echo", "not supported")
        if self.suffix:
            raise FieldError("suffix", "not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise FieldError("prompt", "an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, where: str = "content") -> str:
        """The message content as one string (text parts joined; other parts refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise FieldError(where, f"content of type {part.type!r} is not supported")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            self.max_tokens = self.max_completion_tokens
        for i, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise FieldError(
                    f"messages[{i}].role", f"{message.role!r} is not one of {', '.join(ROLES)}"
                )
            message.text(f"messages[{i}].content")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """Role/content dicts for the chat template ("developer" is the newer "system")."""
        return [{"role": ROLES[m.role], "content": m.text()} for m in self.messages]


def _is_type_name(name: str) -> bool:
    return "[" in name or name[:1].isupper() or name in ("str", "int", "float", "bool", "none")


def parse(kind: type[_Request], body: bytes) -> _Request:
    """Parse and check a request body; APIError(400) that names the offending field."""
    try:
        return kind.model_validate_json(body, strict=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        # Union members show up in loc as type names (str, list[int], TextPart): not fields.
        loc = [str(x) for x in err["loc"] if isinstance(x, int) or not _is_type_name(x)]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({err['msg']})") from None
        if err["type"] == "model_type" and not loc:
            raise APIError(400, "the body must be a JSON object") from None
        param = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or None
        msg = err["msg"].removeprefix("Value error, ")
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):  # a check of the whole body, about one field
            param, msg = cause.param, str(cause)
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None
