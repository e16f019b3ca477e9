"""The ``moeprof`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeprof.errors import UserError

app = typer.Typer(
    help="Log which experts an MoE layer in vLLM picks per token; check, plot and analyse it.",
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
    n: Annotated[
        int, typer.Option("-n", "--num", min=1, help="How many questions, from the first.")
    ] = 25,
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


@app.command()
def generate(
    prompts_file: Annotated[
        Path, typer.Option("--prompts", "-p", help="Prompts file from `moeprof prompts`.")
    ] = Path("prompts.txt"),
    model: Annotated[
        str | None,
        typer.Option(
            help="Hub id or local folder; 'tiny' for the embedded model. "
            "Default: Qwen/Qwen1.5-MoE-A2.7B-Chat with an NVIDIA GPU, tiny without."
        ),
    ] = None,
    log_layer: Annotated[
        int, typer.Option(min=0, help="Decoder layer whose MoE routing to log.")
    ] = 0,
    log: Annotated[
        Path | None, typer.Option(help="Routing log to write [default: OUT_DIR/moe_routes.jsonl].")
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder for timing.json and outputs.jsonl.")] = Path(
        "."
    ),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: int = 1234,
    max_model_len: Annotated[int, typer.Option(min=16)] = 512,
    num_prompts: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N prompts of the file.")
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run without logging, to compare.")
    ] = True,
    baseline_only: Annotated[bool, typer.Option(help="Run without logging only.")] = False,
    repeat: Annotated[
        int, typer.Option(min=1, help="Generation passes per engine (median and spread reported).")
    ] = 1,
    enforce_eager: Annotated[bool, typer.Option(help="No compilation, no CUDA graphs.")] = False,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Apply the chat template [default: when it has one]."
        ),
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Always generate --max-new-tokens.")] = False,
    load_format: Annotated[
        str, typer.Option(help="vLLM load format ('dummy': random weights).")
    ] = "auto",
    dtype: str = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite the files of a previous run.")] = False,
) -> None:
    """Run vLLM without and with the routing hook; write the log, timing.json and outputs.jsonl."""
    from moeprof import generate as lib
    from moeprof.prompts import read_prompts
    from moeprof.ui import RunProgress, print_generate_summary

    try:
        texts = read_prompts(prompts_file)[:num_prompts]
        paths = lib.output_paths(out_dir, log)
        lib.refuse_overwrite(paths, force)
        model_path, label = lib.resolve_model(model)
        settings = lib.Settings(
            model=model_path,
            model_label=label,
            prompts=texts,
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            load_format=load_format,
            dtype=dtype,
            repeat=repeat,
            ignore_eos=ignore_eos,
            chat=chat,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        console.print(
            f"model [bold]{label}[/], {len(texts)} prompts x {max_new_tokens} new tokens, "
            f"layer {log_layer}, prefix caching off (every prompt token is routed and logged)"
        )
        arms: list[tuple[str, Path | None]] = []
        if baseline or baseline_only:
            arms.append(("baseline", None))
        if not baseline_only:
            arms.append(("logged", paths["log"]))
        runs: dict[str, dict] = {}
        with RunProgress(console, total_prompts=len(texts) * repeat) as progress:
            for name, log_path in arms:
                runs[name] = lib.run_engine(
                    name,
                    settings,
                    log=log_path,
                    layer=log_layer,
                    vllm_log=out_dir / f"vllm-{name}.log",
                    on_event=progress.on_event,
                    overwrite_log=force,
                )
        logged = runs.get("logged")
        routes = lib.count_routes(paths["log"]) if logged else None
        report = lib.timing_report(settings, runs.get("baseline"), logged, paths["log"], routes)
        paths["timing"].write_text(json.dumps(report, indent=2) + "\n")
        lib.write_outputs(paths["outputs"], logged or runs["baseline"])
    except UserError as e:
        fail(str(e))
    print_generate_summary(console, report, paths)


def _escape(message: str) -> str:
    """Log content (req ids, reasons) must print literally, not as rich markup."""
    from rich.markup import escape

    return escape(message)


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {_escape(w)}", highlight=False, soft_wrap=True)


@app.command()
def validate(
    log: Annotated[
        Path, typer.Argument(help="The moeprof log (JSONL) to check.", show_default=False)
    ],
    outputs: Annotated[
        Path | None,
        typer.Option(
            help="outputs.jsonl of the same run: check every request has exactly "
            "prompt + generated - 1 routes per logged layer."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    max_errors: Annotated[
        int, typer.Option(min=1, help="How many errors to list (all are counted).")
    ] = 20,
) -> None:
    """Check a log: schema, truncation, duplicates, gaps, token accounting (exit 0/1/2).

    Exit 0 when valid, 1 when invalid, 2 when the input cannot be read.
    """
    from moeprof.analysis import validate as lib

    try:
        report = lib.validate_log(log, outputs=outputs, max_errors=max_errors)
    except UserError as e:
        fail(_escape(str(e)), 2)
    if as_json:
        typer.echo(lib.report_json(report))
    else:
        lib.print_validation(report, console)
    raise typer.Exit(0 if report.valid else 1)


@app.command()
def analyze(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more logs; several are compared layer by layer (JSD).", show_default=False
        ),
    ],
    num_experts: Annotated[
        int | None,
        typer.Option(
            min=1, help="Experts in the layer when the meta does not say (default: max id + 1)."
        ),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="How many top experts to list.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON.")] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the short markdown note to this file.")
    ] = None,
    exclude_suspect: Annotated[
        bool,
        typer.Option(
            help="Leave out records that look like warm-up/dummy batches or double "
            "logging (repeated keys, long runs of identical routes)."
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite the markdown file.")] = False,
) -> None:
    """Expert load per layer and phase: top experts, entropy, imbalance, co-selection.

    Also the normalized distribution, router-weight statistics and signs of contamination.
    """
    from moeprof.analysis import report as lib

    try:
        if markdown is not None and markdown.exists() and not force:
            raise UserError(f"{markdown}: already exists (use --force to overwrite)")
        result = lib.analyze_logs(
            logs, num_experts=num_experts, top=top, exclude_suspect=exclude_suspect
        )
        if markdown is not None:
            lib.write_new(markdown, lib.markdown_note(result), force=force)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings([w for log in result.logs for w in log.warnings])
    if as_json:
        typer.echo(result.to_json())
    else:
        lib.print_report(result, console)
    if markdown is not None:
        err_console.print(f"wrote {markdown}", highlight=False)


@app.command()
def plot(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more logs; several logs or layers give a layer x expert heatmap.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "expert_hist.png"
    ),
    kind: Annotated[
        str,
        typer.Option(
            help="hist (selections per expert), coselect (expert x expert) or "
            "heatmap (layer x expert)."
        ),
    ] = "hist",
    sort: Annotated[bool, typer.Option(help="Order experts by load.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing PNG.")] = False,
    num_experts: Annotated[
        int | None, typer.Option(min=1, help="Experts in the layer when the meta does not say.")
    ] = None,
    exclude_suspect: Annotated[
        bool, typer.Option(help="Leave out records that look like dummy batches.")
    ] = False,
) -> None:
    """Plot expert load from one or more logs."""
    from moeprof.analysis import plots as lib
    from moeprof.analysis.report import analyze_logs

    try:
        if kind not in lib.KINDS:
            raise UserError(f"--kind {kind!r}: choose one of {', '.join(lib.KINDS)}")
        lib.check_writable(out, force)
        result = analyze_logs(logs, num_experts=num_experts, exclude_suspect=exclude_suspect)
        written = lib.plot(result, out, kind=kind, sort=sort, force=force)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings([w for log in result.logs for w in log.warnings])
    console.print(f"wrote [bold]{written}[/]", highlight=False)


def main() -> None:
    app()
