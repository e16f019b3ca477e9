"""The ``moeprof`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeprof.errors import UserError

app = typer.Typer(
    help="Log which experts an MoE layer in vLLM picks, token by token; check, plot and analyse it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Every user-facing error leaves through here: one line, no traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def prompts(
    n: Annotated[int, typer.Option("-n", "--num", min=1, help="How many questions, from the first.")] = 25,
    source: Annotated[
        Path | None,
        typer.Option(help="Local GSM8K copy (JSONL or parquet) instead of the Hugging Face hub."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Prompts file to write.")] = Path(
        "prompts.txt"
    ),
    jsonl: Annotated[
        Path | None, typer.Option(help="Also write the prompts as JSONL ({'idx','prompt'}).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Write the first N questions of the GSM8K test split as a prompts file."""
    from moeprof import prompts as lib

    try:
        questions = lib.load_gsm8k(n, source)
        written = lib.write_prompts(questions, out, jsonl, force=force)
    except UserError as e:
        fail(str(e))
    for path in written:
        console.print(f"wrote {len(questions)} prompts to [bold]{path}[/]")


def main() -> None:
    app()
