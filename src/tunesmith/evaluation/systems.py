"""A compared system: a model and how it is prompted.

- base_zero_shot: the base model, the same system prompt, the test prompt as the user turn;
- base_few_shot: the same, with k training examples (every label covered) as prior user/assistant turns;
- base_best_prompt: the prompting variant chosen on the validation split (evaluation/prompting.py): retrieved
  nearest-neighbour shots, an instruction naming the answer format, calibrated label scoring, ...;
- fine_tuned: the run's model, prompted exactly as in training.

A System's shots are fixed (`shots`) or retrieved per example (`retriever`); `instruction` is appended to the
system prompt. `content_free` builds the inputs contextual calibration scores the labels on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.example import Example, Message
from tunesmith.evaluation.shots import input_text
from tunesmith.models.util import pad_id


@dataclass
class System:
    key: str
    name: str
    model: object
    tokenizer: object
    renderer: object
    shots: list[Example] = field(default_factory=list)
    retriever: object = None  # evaluation.shots.ShotRetriever: the k most similar training examples per example
    instruction: str | None = None  # appended to the system prompt (e.g. "Answer with exactly one of: ...")
    _retrieved: dict = field(default_factory=dict, repr=False, compare=False)  # (source, input) -> shots

    def prepare(self, examples: list[Example]) -> None:
        """Retrieve the shots of many examples in one batch (a retriever's shots are otherwise found one by one)."""
        if self.retriever is not None:
            todo = [ex for ex in examples if _cache_key(ex) not in self._retrieved]
            for ex, shots in zip(todo, self.retriever.shots_for_many(todo)):
                self._retrieved[_cache_key(ex)] = shots

    def shots_for(self, ex: Example) -> list[Example]:
        if self.retriever is None:
            return self.shots
        key = _cache_key(ex)
        if key not in self._retrieved:
            self._retrieved[key] = self.retriever.shots_for(ex)
        return self._retrieved[key]

    @property
    def n_shots(self) -> int:
        return self.retriever.k if self.retriever is not None else len(self.shots)

    @property
    def pad(self) -> int:
        return pad_id(self.tokenizer)

    def messages(self, ex: Example, shots: list[Example] | None = None) -> list[Message]:
        """The conversation the model answers: the example's turns (a completion's prompt is the user turn),
        with the shots inserted after any leading system messages and the instruction ending the system prompt."""
        turns = list(ex.prompt_messages()) if ex.kind == "chat" else [Message("user", ex.prompt or "")]
        lead = 0
        while lead < len(turns) and turns[lead].role == "system":
            lead += 1
        system = turns[:lead]
        if self.instruction:
            if system:
                system[-1] = Message("system", f"{system[-1].content}\n\n{self.instruction}")
            else:
                prompt = self.renderer.system_prompt
                system = [Message("system", f"{prompt}\n\n{self.instruction}" if prompt else self.instruction)]
        shots = self.shots_for(ex) if shots is None else shots
        turns_of_shots = [m for s in shots for m in (Message("user", input_text(s)), Message("assistant", s.answer()))]
        return [*system, *turns_of_shots, *turns[lead:]]

    def content_free(self, ex: Example, text: str) -> Example:
        """`ex` with its input replaced by a content-free text ("N/A", ""). Prompt it with `shots_for(ex)` (the
        shots of the real example), so the label probabilities it gets measure the prompt's bias alone."""
        if ex.kind == "completion":
            out = Example(kind="completion", prompt=text, completion=ex.completion, source=ex.source)
        else:
            turns = list(ex.prompt_messages())
            last = max((i for i, m in enumerate(turns) if m.role == "user"), default=None)
            if last is None:
                turns.append(Message("user", text))
            else:
                turns[last] = Message("user", text)
            out = Example(kind="chat", messages=[*turns, Message("assistant", ex.answer() or "")], source=ex.source)
        return out

    def prompt(self, ex: Example, shots: list[Example] | None = None) -> list[int]:
        if self.renderer.raw_prompts and ex.kind == "completion":  # prompted as trained: raw text
            return self.pair(ex, "")[0]
        return self.renderer.prompt_ids(self.messages(ex, shots), add_generation_prompt=True)

    def pair(self, ex: Example, answer: str, shots: list[Example] | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids, trained ids of `answer`), as training renders the example with that answer."""
        from tunesmith.evaluation.classify import split_encoded

        if self.renderer.raw_prompts and ex.kind == "completion":  # prompted as trained: raw text
            return split_encoded(self.renderer, Example(kind="completion", prompt=ex.prompt, completion=answer))
        msgs = self.messages(ex, shots)
        full = Example(kind="chat", messages=[*msgs, Message("assistant", answer)], source=ex.source)
        return split_encoded(self.renderer, full, self.renderer.prompt_ids(msgs, add_generation_prompt=True))


def _cache_key(ex: Example) -> tuple[str, str]:
    """What a retriever's answer depends on, and which example it is: a System serves the validation and the test
    split, so the key is the example's content and origin, never its id() (which a freed object passes on)."""
    return ex.source, input_text(ex)
