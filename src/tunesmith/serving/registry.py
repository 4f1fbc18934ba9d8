"""What the server serves: one base model, loaded once, and the fine-tuned adapters of it.

Each served model has an id a request names in `model`:
- the base: its name as given to `--base` (a built-in name, or the folder name of a local model directory);
- a run: `ft:<base>:<run-name>` (the run's `name` from its config.yaml, else its folder name); the bare run
  name is accepted too.

Adapters are attached with peft's multi-adapter API (`PeftModel.from_pretrained` for the first,
`load_adapter` for the next) onto the one copy of the base weights; a request for the base runs under
`disable_adapter()`. Only runs whose `model/` is a peft adapter that changes layers in place (lora, dora,
ia3) can be switched per request like this, and peft keeps one adapter type per model (LoRA and DoRA are
one type; IA3 another). Other runs are refused with an error that says why: full/freeze fine-tunes have
their own weights (serve them from their own server), tunesmith's bottleneck `adapter` method inserts
modules into the base that cannot be switched off per request, and prefix/prompt tuning are prompt-learning
methods peft cannot mix with switchable adapters. Refusing costs a second process for such runs; loading
them as separate models here would silently multiply memory, which we prefer to leave to the user's choice.

Prompts: each run is prompted as it was trained. Its Renderer uses the run's `model.chat_template` and
`data.system_prompt`; the system prompt is put first only when the request has no system message of its
own (the request's wins). `/v1/completions` takes its prompt as raw text, tokenized as training tokenizes
prompt/completion examples (BOS exactly where the tokenizer adds one): the endpoint for runs trained on
prompt/completion or plain text data. `/v1/chat/completions` always renders the run's chat template.

Batches: requests for one model are batched together; when every adapter is a plain LoRA, requests for
different adapters and the base share a batch too (peft's mixed-batch `adapter_names`; DoRA and IA3 do not
support it, so their requests are batched per model).

All methods that touch the model (`add_run`, `activate`) must run on the engine thread.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ModelError, RunError
from tunesmith.run_dir import RunDir

# saved method -> peft adapter type, for the methods that can share the base
SWITCHABLE = {"lora": "LORA", "dora": "LORA", "ia3": "IA3"}

_REFUSED = {
    "full": "it is a full fine-tune with weights of its own, which cannot share the base model's weights; "
    "serve it from a separate `tunesmith serve` process",
    "freeze": "it is a partial fine-tune (freeze) with weights of its own, which cannot share the base model's "
    "weights; serve it from a separate `tunesmith serve` process",
    "adapter": "tunesmith's bottleneck adapters are inserted into the base model and cannot be switched off per "
    "request; retrain it with method: lora to serve it next to other runs",
    "prefix": "prefix tuning is a prompt-learning method that peft cannot mix with per-request adapters; "
    "retrain it with method: lora to serve it",
    "prompt": "prompt tuning is a prompt-learning method that peft cannot mix with per-request adapters; "
    "retrain it with method: lora to serve it",
}


class UnknownModel(LookupError):
    pass


class Conflict(ValueError):
    pass


@dataclass
class Served:
    """One model id the server answers to."""

    id: str
    renderer: object  # tunesmith.data.templates.Renderer
    adapter_name: str | None = None  # peft's name for it; None for the base
    run_path: Path | None = None
    method: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stop_token_ids(self) -> list[int]:
        return self.renderer.stop_token_ids

    @property
    def marker_stops(self) -> list[str]:
        """End-of-turn markers as text: they end generation like stop strings and are never shown (special
        tokens are skipped in decoding anyway; this catches markers that are several plain tokens)."""
        return list(self.renderer.stop_strings)


class Registry:
    def __init__(self, base: str, dtype: str = "auto", device: str = "auto"):
        from tunesmith import models
        from tunesmith.data.templates import Renderer

        self.base_name = base
        self.base_path = models.resolve(base).resolve()  # a built-in model not yet cached is pulled here, with progress
        self.model, self.tokenizer = models.load(base, dtype=dtype, device=device)
        self.base_id = base if not Path(base).expanduser().exists() else Path(base).expanduser().resolve().name
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context_length: int | None = getattr(text, "max_position_embeddings", None)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads
        self.peft_type: str | None = None
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {self.base_id: Served(self.base_id, Renderer(self.tokenizer))}
        self._aliases: dict[str, str] = {}
        self._count = 0

    # ---- lookups (any thread) ------------------------------------------------------------------------------

    def get(self, model_id: str) -> Served:
        with self._lock:
            served = self._served.get(model_id) or self._served.get(self._aliases.get(model_id, ""))
        if served is None:
            raise UnknownModel(
                f"The model `{model_id}` does not exist on this server; GET /v1/models lists the "
                f"served models ({', '.join(self.ids())})"
            )
        return served

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._served)

    def all(self) -> list[Served]:
        with self._lock:
            return list(self._served.values())

    def serves_run(self, run_dir: str | Path) -> bool:
        path = Path(run_dir).resolve()
        with self._lock:
            return any(s.run_path == path for s in self._served.values())

    # ---- engine thread ---------------------------------------------------------------------------------------

    def mixable(self, model_id: str) -> bool:
        """Whether requests for `model_id` can share a batch with requests for other models: peft's mixed
        batches (`adapter_names`, one adapter per row) work for LoRA adapters, not for DoRA or IA3."""
        if self.peft_type != "LORA":
            return False
        served = self.get(model_id)
        return served.adapter_name is None or served.method == "lora"

    @contextmanager
    def activate(self, model_ids: list[str]):
        """Context in which the model computes a batch whose rows are for `model_ids`; yields the extra
        forward() arguments (peft's per-row `adapter_names` for a batch of several models)."""
        served = [self.get(m) for m in model_ids]
        names = [s.adapter_name for s in served]
        if self.peft_type is None:  # no adapters loaded: the base model itself
            yield {}
        elif len(set(names)) > 1:
            yield {"adapter_names": [n or "__base__" for n in names]}
        elif names[0] is None:
            with self.model.disable_adapter():
                yield {}
        else:
            self.model.set_adapter(names[0])
            yield {}

    def add_run(self, run_dir: str | Path, name: str | None = None) -> Served:
        """Attach a run's adapter and serve it as `ft:<base>:<name>`; RunError/ModelError/Conflict say why not."""
        from tunesmith.data.templates import Renderer

        path = Path(run_dir).expanduser().resolve()
        cfg = RunDir.open(path).config
        method = _check_model_dir(path)
        self._check_base(path, cfg.model.name)
        run_name = name or cfg.name or path.name
        model_id = f"ft:{self.base_id}:{run_name}"
        with self._lock:
            if model_id in self._served:
                raise Conflict(f"`{model_id}` is already served; give this run another name")
        peft_type = SWITCHABLE[method]
        if self.peft_type is not None and peft_type != self.peft_type:
            raise RunError(
                f"{path}: a {method} adapter cannot be served next to {self.peft_type.lower()} adapters "
                "(peft holds one adapter type per model); serve it from a separate `tunesmith serve` process"
            )
        renderer = Renderer(self.tokenizer, cfg.model.chat_template, cfg.data.system_prompt)
        adapter_name = f"run{self._count}"  # peft names become module keys: no dots, so not the run name
        self._attach(path / "model", adapter_name)
        self._count += 1
        self.peft_type = peft_type
        served = Served(model_id, renderer, adapter_name=adapter_name, run_path=path, method=method)
        with self._lock:
            self._served[model_id] = served
            self._aliases.setdefault(run_name, model_id)
        return served

    def _attach(self, model_dir: Path, adapter_name: str) -> None:
        from peft import PeftModel

        try:
            if self.peft_type is None:
                self.model = PeftModel.from_pretrained(self.model, model_dir, adapter_name=adapter_name)
            else:
                self.model.load_adapter(model_dir, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise ModelError(
                f"{model_dir}: peft cannot load this adapter onto {self.base_name}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None
        self.model.eval()

    def _check_base(self, path: Path, trained_on: str) -> None:
        from tunesmith import models

        try:
            run_base = models.resolve(trained_on, progress=False).resolve()
        except ModelError as e:
            raise ModelError(f"{path}: its base model {trained_on!r} cannot be found: {e}") from None
        if run_base != self.base_path:
            raise ModelError(
                f"{path}: was fine-tuned from {trained_on!r}, but this server's base model is {self.base_name!r}; "
                f"serve it from a server started with --base {trained_on}"
            )


def _check_model_dir(path: Path) -> str:
    from tunesmith.methods.saving import saved_method

    model_dir = RunDir(path).require_model("serve")
    method = saved_method(model_dir)
    if method == "peft":  # made elsewhere: serve it if it is a LoRA
        peft_type = json.loads((model_dir / "adapter_config.json").read_text()).get("peft_type")
        method = {"LORA": "lora", "IA3": "ia3"}.get(peft_type, method)
    if method not in SWITCHABLE:
        reason = _REFUSED.get(method, f"its method {method!r} is not a peft adapter that can be switched per request")
        raise RunError(f"{path}: cannot be served on the shared base model: {reason}")
    if not (model_dir / "adapter_model.safetensors").is_file():  # a .bin adapter would be unpickled
        raise RunError(
            f"{model_dir}: no adapter_model.safetensors; only safetensors adapters are served "
            "(re-save the adapter with peft's save_pretrained(..., safe_serialization=True))"
        )
    return method
