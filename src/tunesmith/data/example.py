"""The one in-memory shape every input format is normalised to.

Formats map onto four kinds:
- chat: OpenAI chat rows (`messages`) and Alpaca rows (instruction/input -> user, output -> assistant)
- completion: prompt/completion rows (raw text, no chat template; loss on the completion)
- text: raw text for continued pretraining (loss on every token)
- preference: a prompt with a chosen and a rejected answer (DPO, ORPO, SimPO). The prompt is either raw text
  (`prompt`, the plain {"prompt", "chosen", "rejected"} rows: rendered without a chat template, like completion
  rows) or chat turns (`messages`: the chat form and OpenAI's DPO format: rendered with the chat template, the
  answers as the next assistant turn). `chosen` / `rejected` are the answers' text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")
Kind = Literal["chat", "completion", "text", "preference"]


@dataclass
class Message:
    role: str
    content: str
    weight: int | None = None
    """OpenAI's per-message weight on assistant messages: 0 = not trained, 1 or None = trained."""

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight != 0


@dataclass
class Example:
    kind: Kind
    messages: list[Message] = field(default_factory=list)
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    source: str = ""
    """Where it came from, as FILE:LINE, for messages that point the user at the row."""
    metadata: dict | None = None
    """The row's `metadata` object, as read (e.g. a category that an evaluation groups results by)."""

    @property
    def is_chat_pair(self) -> bool:
        """A preference pair whose prompt is chat turns (rendered with the chat template)."""
        return self.kind == "preference" and self.prompt is None

    def prompt_messages(self) -> list[Message]:
        """The conversation before the final assistant message (what a model is asked)."""
        if self.kind != "chat":
            raise ValueError("prompt_messages() is for chat examples")
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return self.messages[:last]

    def answer(self) -> str | None:
        """The reference answer: the final assistant message, or the completion."""
        if self.kind == "chat":
            for m in reversed(self.messages):
                if m.role == "assistant":
                    return m.content
            return None
        if self.kind == "completion":
            return self.completion
        if self.kind == "preference":
            return self.chosen
        return None

    def input_key(self) -> str:
        """Text identifying the input (for duplicate, conflict and leakage checks)."""
        if self.kind == "chat":
            return "\n".join(f"{m.role}: {m.content}" for m in self.prompt_messages())
        if self.kind == "preference" and self.prompt is None:
            return "\n".join(f"{m.role}: {m.content}" for m in self.messages)
        if self.kind in ("completion", "preference"):
            return self.prompt or ""
        return self.text or ""
