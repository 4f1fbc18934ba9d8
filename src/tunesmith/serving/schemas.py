"""Request bodies of the OpenAI-compatible endpoints, and the shapes of the answers.

Field names follow OpenAI's API reference (and what vLLM and llama.cpp's server return): a completion is
`{id, object, created, model, choices: [{index, message: {role, content}, finish_reason}], usage:
{prompt_tokens, completion_tokens, total_tokens}}`; a stream is `chat.completion.chunk` objects with a
`delta`, then (with `stream_options.include_usage`) one chunk with empty `choices` and the usage, then
`data: [DONE]`.

Unknown fields are ignored (clients send things like `user`), but features we do not implement are refused
with a 400 naming the parameter when a request asks for them, rather than silently ignored.

Types are strict, as OpenAI's are: `max_tokens: "8"` or `max_tokens: true` is a 400 naming the field, not 8 or
1 token (pydantic's lax mode would coerce both). Text may not hold a NUL character (U+0000): no model is
trained to read one, and it is what binary data or a C string's terminator leaking into a prompt looks like,
so the client is told where it is rather than having it silently tokenized or stripped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# parameter -> the values that mean "not asked for"
UNSUPPORTED = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


def unsupported_param(raw: dict) -> str | None:
    for name, defaults in UNSUPPORTED.items():
        if name in raw and raw[name] not in defaults:
            return name
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    stop: list[str] | None = None
    seed: int | None = Field(None, strict=True)
    n: int = Field(1, ge=1, le=16, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: "StreamOptions | None" = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("give a string or a list of strings")
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        for s in stops:
            check_text(s)
        return stops

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # OpenAI takes `"temperature": null` (and n, top_p, stream) as "not given"; some clients send it
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in ("temperature", "top_p", "n", "stream"))}
        return data

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, strict=True)


def check_text(text: str) -> str:
    at = text.find("\0")
    if at >= 0:
        raise ValueError(
            f"contains a NUL character (U+0000) at offset {at}; remove it (text only: if it came from a binary "
            "file, decode or drop that data first)"
        )
    return text


def join_parts(content) -> str | None:
    """A message's content as one string. OpenAI's content-part lists are accepted when every part is text;
    the parts are joined with a newline, as vLLM and TensorRT-LLM's OpenAI servers do (OpenAI does not say how
    it joins them). Other part types (image_url, input_audio, file, refusal, ...) need inputs this server's
    text models cannot read, so they are refused by name."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError('give a string or a list of content parts like {"type": "text", "text": "..."}')
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"has type {kind!r}" if isinstance(kind, str) else 'is not a {"type": "text", ...} object'
            raise ValueError(f'content part {i} {what}; this server reads text parts only ({{"type": "text"}})')
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i} has no `text` string")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        v = join_parts(v)
        return v if v is None else check_text(v)

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, strict=True)  # OpenAI's default for /v1/completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("give a string or a list of strings (token-id prompts are not supported)")
        if not prompts:
            raise ValueError("give at least one prompt")
        for i, p in enumerate(prompts):
            try:
                check_text(p)
            except ValueError as e:
                raise ValueError(f"prompt {i} {e}" if isinstance(v, list) else str(e)) from None
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def max_new(self) -> int | None:
        return self.max_tokens


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    """A run directory whose model/ is a LoRA/DoRA/IA3 adapter of the served base model, inside one of the
    folders the server loads adapters from (see app.AdapterRoots)."""
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    """The run name in the served id `ft:<base>:<name>`; default: the run's own name."""

    @field_validator("path")
    @classmethod
    def _path(cls, v):
        if not v:
            raise ValueError("give the run directory's path")
        return check_text(v)


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(served, base_id: str) -> dict:
    card = {
        "id": served.id,
        "object": "model",
        "created": served.created,
        "owned_by": "tunesmith",
        "root": served.id,  # never the run's path: clients need not know the server's filesystem
        "parent": None,
    }
    if served.adapter_name is not None:
        card["parent"] = base_id
    return card


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
