"""`tunesmith export`: a run's model as a merged Hugging Face directory, a GGUF file, or a peft adapter."""

from __future__ import annotations

import click

from tunesmith import api


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory to write (must be new or empty).")
@click.option(
    "--merge",
    is_flag=True,
    help="Merge the adapter into the base weights: a Hugging Face model directory "
    "that transformers loads without peft or tunesmith.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "gguf"]),
    default=None,
    help="safetensors (with --merge; the default) or gguf: one .gguf file for llama.cpp (merges first).",
)
@click.option(
    "--quant", type=click.Choice(["f16", "q8_0", "f32"]), default=None, help="GGUF weight type. [default: f16]"
)
@click.option(
    "--adapter-only", is_flag=True, help="Only the adapter, in peft's format (what peft, vLLM and LoRAX load)."
)
@click.option(
    "--llama-cpp",
    "llama_cpp",
    is_flag=True,
    help="GGUF: also run the file in llama.cpp (pip install xllamacpp) and require the run's greedy answers.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export(run_dir, out, merge, fmt, quant, adapter_only, llama_cpp, force):
    """Export RUN_DIR's model for use outside tunesmith.

    Every export is read back by an independent loader and compared with the run's own model on a few prompts
    (max |logit difference| within a stated tolerance, identical greedy outputs); the figures are printed and
    saved as OUT/equivalence.json, with a model card in OUT/README.md. If the check fails nothing is written.

    \b
    Examples:
      tunesmith export runs/tickets --merge --out exports/tickets
      tunesmith export runs/tickets --format gguf --quant q8_0 --out exports/tickets-gguf
      tunesmith export runs/tickets --format gguf --llama-cpp --out exports/tickets-gguf
      tunesmith export runs/tickets --adapter-only --out exports/tickets-lora
    """
    result = api.export(
        run_dir,
        out,
        merge=merge,
        format=fmt,
        quant=quant,
        adapter_only=adapter_only,
        force=force,
        llama_cpp=llama_cpp,
        log=click.echo,
    )
    click.echo(f"wrote {result['out']}")
