"""The ``moeprof`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from moeprof.errors import UserError

if TYPE_CHECKING:
    from moeprof.layers import LayerSelection

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


# Options that several commands take, declared once: the flag, its type and bounds are the same
# everywhere, and each command says in ``help`` what the option means there. Each returns an
# ``Annotated`` type, so it is named like one: ``force: Force("Overwrite the PNG.") = False``.


def Force(help: str) -> Any:
    return Annotated[bool, typer.Option(help=help)]


def NumExperts(help: str) -> Any:
    return Annotated[int | None, typer.Option(min=1, help=help)]


def ExcludeSuspect(help: str) -> Any:
    return Annotated[bool, typer.Option(help=help)]


def AsJson(help: str) -> Any:
    return Annotated[bool, typer.Option("--json", help=help)]


def Layer(help: str) -> Any:
    return Annotated[str | None, typer.Option("--layer", metavar="LAYERS", help=help)]


def EpRanks(help: str, panel: str | None = None) -> Any:
    """Expert-parallel rank counts, e.g. ``2,4,8`` (parsed by ``_rank_counts``)."""
    return Annotated[str | None, typer.Option(metavar="R,...", help=help, rich_help_panel=panel)]


def RedundantExperts(help: str, panel: str | None = None) -> Any:
    return Annotated[int, typer.Option(min=0, help=help, rich_help_panel=panel)]


class PlotKind(str, Enum):
    """``plot --kind``: one of :data:`moeprof.analysis.plots.KINDS`."""

    hist = "hist"
    coselect = "coselect"
    heatmap = "heatmap"
    transitions = "transitions"
    reuse = "reuse"
    ep = "ep"


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
    force: Force("Overwrite existing files.") = False,
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
        str,
        typer.Option(
            metavar="LAYERS",
            help="Decoder layers whose MoE routing to log: an index (12), a list (0,12,23), "
            "ranges (0-11,23) or 'all' (every MoE layer). A dense layer named explicitly is "
            "refused at engine start.",
        ),
    ] = "0",
    log: Annotated[
        Path | None,
        typer.Option(help="Routing log to write.", show_default="OUT_DIR/moe_routes.jsonl"),
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
            "--chat/--no-chat", help="Apply the chat template.", show_default="when it has one"
        ),
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Always generate --max-new-tokens.")] = False,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="vLLM's prefix caching: cached prompt tokens skip the router and are not "
            "logged; outputs.jsonl records num_cached_tokens per request, so validate --outputs "
            "stays exact.",
        ),
    ] = False,
    load_format: Annotated[
        str, typer.Option(help="vLLM load format ('dummy': random weights).")
    ] = "auto",
    dtype: str = "auto",
    force: Force("Overwrite the files of a previous run.") = False,
) -> None:
    """Run vLLM without and with the routing hook; write the log, timing.json and outputs.jsonl.

    Exit 0; 1 when the hook refused to start (its one line is printed); 2 for bad input or a
    failed engine; 3 when logging stopped during the run (disk full, log removed: the hook's
    line is printed; timing.json and outputs.jsonl are written, the log is incomplete).
    """
    from moeprof import generate as lib
    from moeprof.render.generate import RunProgress, print_generate_summary

    try:
        job = lib.prepare(
            prompts_file,
            out_dir=out_dir,
            log=log,
            layer=log_layer,
            model=model,
            num_prompts=num_prompts,
            baseline=baseline,
            baseline_only=baseline_only,
            force=force,
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            load_format=load_format,
            dtype=dtype,
            repeat=repeat,
            ignore_eos=ignore_eos,
            prefix_caching=prefix_caching,
            chat=chat,
        )
        console.print(
            f"model [bold]{job.settings.model_label}[/], {len(job.settings.prompts)} prompts x "
            f"{max_new_tokens} new tokens, {_layers_label(job.layers)}, "
            + (
                "prefix caching on (cached prompt tokens are not routed; outputs.jsonl "
                "records how many per request)"
                if prefix_caching
                else "prefix caching off (every prompt token is routed and logged)"
            ),
            highlight=False,
        )
        with RunProgress(console, total_prompts=job.total_prompts) as progress:
            report = lib.run_job(job, on_event=progress.on_event)
    except lib.EngineRefused as e:
        fail(_escape(str(e)), 1)
    except UserError as e:
        fail(str(e))
    print_generate_summary(console, report, job.paths)
    stopped = report.get("log", {}).get("stopped")
    if stopped:
        err_console.print(
            f"[bold red]error:[/] {_escape(stopped)}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(lib.EXIT_LOG_STOPPED)


def _layers_label(layers: LayerSelection) -> str:
    """``layer 12``, ``layers 0-11,23``, ``every MoE layer``."""
    if layers.is_all:
        return "every MoE layer"
    return f"layer{'s' if len(layers.indices) > 1 else ''} {layers}"


def _escape(message: str) -> str:
    """Log content (req ids, reasons) must print literally, not as rich markup."""
    from rich.markup import escape

    return escape(message)


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {_escape(w)}", highlight=False, soft_wrap=True)


@app.command()
def validate(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="The log(s) to check: JSONL files, Parquet logs (a routes.parquet directory "
            "or a file named *.parquet), globs; a run's data-parallel rank files are checked "
            "as one log.",
            show_default=False,
        ),
    ],
    outputs: Annotated[
        Path | None,
        typer.Option(
            help="outputs.jsonl of the same run: check every request has exactly "
            "prompt - cached + generated - 1 routes per logged layer, at positions "
            "cached..end (cached: prompt tokens served from the prefix cache, as recorded)."
        ),
    ] = None,
    as_json: AsJson("Print the report as JSON.") = False,
    max_errors: Annotated[
        int, typer.Option(min=1, help="How many errors to list (all are counted).")
    ] = 20,
    require_complete: Annotated[
        bool,
        typer.Option(
            help="A log moeprof's hook did not close cleanly (engine killed, crashed or still "
            "running) is invalid, not just warned about."
        ),
    ] = False,
) -> None:
    """Check a log: schema, truncation, duplicates, gaps, completeness, token accounting.

    Exit 0 when valid, 1 when invalid, 2 when the input cannot be read. A log not closed
    cleanly is a warning (exit 0) unless --require-complete. With --json: one report, or a
    list of reports for several logs.
    """
    from moeprof.analysis import validate as lib
    from moeprof.render.validate import print_validation

    try:
        reports = lib.validate_logs(
            list(logs), outputs=outputs, max_errors=max_errors, require_complete=require_complete
        )
    except UserError as e:
        fail(_escape(str(e)), 2)
    if as_json:
        if len(reports) == 1:
            typer.echo(lib.report_json(reports[0]))
        else:
            typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for report in reports:
            print_validation(report, console)
    raise typer.Exit(0 if all(r.valid for r in reports) else 1)


@app.command()
def analyze(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more logs; several are compared layer by layer (JSD).", show_default=False
        ),
    ],
    num_experts: NumExperts(
        "Experts in the layer when the meta does not say (default: max id + 1)."
    ) = None,
    top: Annotated[int, typer.Option(min=1, help="How many top experts to list.")] = 3,
    as_json: AsJson("Print the analysis as JSON.") = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the short markdown note to this file.")
    ] = None,
    exclude_suspect: ExcludeSuspect(
        "Leave out records that look like warm-up/dummy batches or double "
        "logging (repeated keys, long runs of identical routes)."
    ) = False,
    force: Force("Overwrite the markdown file.") = False,
    layer: Layer(
        "Only these layers: an index (12), a list (0,12,23) or ranges (0-11,23). "
        "Default: every logged layer."
    ) = None,
    details: Annotated[
        bool,
        typer.Option(
            help="For logs of several layers: the full table (a row per layer and phase, "
            "router weights, co-selected pairs) instead of one summary row per layer."
        ),
    ] = False,
    outputs: Annotated[
        Path | None,
        typer.Option(
            help="generate's outputs.jsonl: what each expert handles (its top tokens), "
            "joined on (req_id, token_idx).",
            rich_help_panel="More analyses",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer to decode tokens with (default: the meta's model).",
            rich_help_panel="More analyses",
        ),
    ] = None,
    cross_layer: Annotated[
        bool,
        typer.Option(
            help="How routing at one layer predicts the next: mutual information, top "
            "transitions (logs of several layers).",
            rich_help_panel="More analyses",
        ),
    ] = False,
    reuse: Annotated[
        bool,
        typer.Option(
            help="Expert reuse between consecutive tokens: overlap, LRU cache hit rate.",
            rich_help_panel="More analyses",
        ),
    ] = False,
    ep: Annotated[
        bool,
        typer.Option(
            help="Per-pass load balance under expert parallelism, contiguous and EPLB "
            "placement (logs with step).",
            rich_help_panel="More analyses",
        ),
    ] = False,
    ep_ranks: EpRanks(
        "Expert-parallel rank counts for --ep, e.g. 2,4,8 (default: the divisors of the expert "
        "count among 2, 4, 8, 16).",
        "More analyses",
    ) = None,
    redundant_experts: RedundantExperts(
        "Redundant expert slots for EPLB in --ep.", "More analyses"
    ) = 0,
    full: Annotated[
        bool,
        typer.Option(
            help="Every analysis the log supports (with --outputs: the token analysis too).",
            rich_help_panel="More analyses",
        ),
    ] = False,
) -> None:
    """Expert load per layer and phase: top experts, entropy, imbalance, co-selection.

    Also the normalized distribution, router-weight statistics and signs of contamination.
    A log of several layers gets one summary row per layer (--details for everything).
    """
    from moeprof.analysis import analyze as lib
    from moeprof.analysis.passes import PassOptions
    from moeprof.outfiles import refuse_existing, write_new
    from moeprof.render.analyze import print_report
    from moeprof.render.note import markdown_note

    try:
        if markdown is not None:
            refuse_existing(markdown, force)  # before the (possibly long) analysis
        result = lib.analyze_logs(
            logs,
            num_experts=num_experts,
            top=top,
            exclude_suspect=exclude_suspect,
            layers=lib.chosen_layers(layer),
            analyses=_chosen_analyses(
                full=full, tokens=outputs is not None, cross_layer=cross_layer, reuse=reuse, ep=ep
            ),
            options=PassOptions(
                outputs=outputs,
                tokenizer=tokenizer,
                ep_ranks=_rank_counts(ep_ranks),
                redundant_experts=redundant_experts,
                top=top,
            ),
        )
        if markdown is not None:
            write_new(markdown, markdown_note(result), force=force)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings([w for log in result.logs for w in log.warnings])
    if as_json:
        typer.echo(result.to_json())
    else:
        print_report(result, console, details=details)
    if markdown is not None:
        err_console.print(f"wrote {markdown}", highlight=False)


def _chosen_analyses(*, full: bool, **chosen: bool) -> list[str]:
    """The extra analyses' names (see moeprof.analysis.passes) the flags ask for."""
    return [name for name, on in chosen.items() if on or full]


def _rank_counts(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--ep-ranks {text!r}: give rank counts such as 2,4,8") from None
    if any(c < 1 for c in counts):
        raise UserError(f"--ep-ranks {text!r}: rank counts must be >= 1")
    return counts


@app.command()
def counts(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One log: a JSONL file, a Parquet log (a routes.parquet directory or a "
            "*.parquet file) or a glob; a run's data-parallel rank files count as one log.",
            show_default=False,
        ),
    ],
    num_experts: NumExperts(
        "Experts in the layer when the meta does not say (default: max id + 1)."
    ) = None,
    as_json: AsJson(
        "Print the counts as JSON: per layer the numbers of the table, then the counts per "
        "expert, in all and per phase."
    ) = False,
) -> None:
    """Expert load per layer, the fast path: routes, CV, max/mean, Gini, entropy, unused.

    The load-balance numbers analyze prints per layer, from expert counts alone.
    A Parquet log is read three columns at a time (layer, phase, topk_ids).
    Checked: expert ids (in range, distinct), logged layers, phases.
    Not checked: the rules on req_id, token_idx and step; use validate for those.
    Exit 2 when the log cannot be read (one line: file:line: reason).
    """
    from moeprof import api
    from moeprof.render.counts import print_counts

    try:
        result = api.expert_counts(list(logs), num_experts=num_experts)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings(list(result.warnings))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_counts(result, console)


@app.command()
def plot(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more logs; several logs or layers give a layer x expert heatmap "
            "(--layer N for one layer's histogram).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path(
        "expert_hist.png"
    ),
    kind: Annotated[
        PlotKind,
        typer.Option(
            help="hist (selections per expert), coselect (expert x expert), "
            "heatmap (layer x expert), transitions (expert at layer l x expert at the next "
            "logged layer: lift; --layer l picks l), reuse (LRU expert-cache hit rate "
            "against cache size, a line per layer) or ep (balancedness per engine step under "
            "expert parallelism, contiguous and EPLB placement, a panel per rank count)."
        ),
    ] = PlotKind.hist,
    sort: Annotated[bool, typer.Option(help="Order experts by load.")] = False,
    force: Force("Overwrite an existing PNG.") = False,
    num_experts: NumExperts("Experts in the layer when the meta does not say.") = None,
    exclude_suspect: ExcludeSuspect("Leave out records that look like dummy batches.") = False,
    layer: Layer(
        "Only these layers: an index (12), a list (0,12,23) or ranges (0-11,23); one layer "
        "gives its histogram or co-selection matrix. Default: every logged layer."
    ) = None,
    ep_ranks: EpRanks(
        "For --kind ep: expert-parallel rank counts, a panel each, e.g. 2,4,8 (default: the "
        "divisors of the expert count among 2, 4, 8, 16)."
    ) = None,
    redundant_experts: RedundantExperts("For --kind ep: redundant expert slots for EPLB.") = 0,
) -> None:
    """Plot expert load from one or more logs."""
    from moeprof.analysis import plots as lib
    from moeprof.analysis.analyze import analyze_logs, chosen_layers
    from moeprof.analysis.passes import PassOptions

    try:
        if kind is not PlotKind.ep and (ep_ranks is not None or redundant_experts):
            raise UserError("--ep-ranks and --redundant-experts are options of --kind ep")
        lib.check_writable(out, force)
        result = analyze_logs(
            logs,
            num_experts=num_experts,
            exclude_suspect=exclude_suspect,
            layers=chosen_layers(layer),
            analyses=[lib.ANALYSIS_OF_KIND[kind.value]]
            if kind.value in lib.ANALYSIS_OF_KIND
            else [],
            options=PassOptions(
                ep_ranks=_rank_counts(ep_ranks), redundant_experts=redundant_experts
            ),
        )
        written = lib.plot(result, out, kind=kind.value, sort=sort, force=force)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings([w for log in result.logs for w in log.warnings])
    console.print(f"wrote [bold]{written}[/]", highlight=False)


@app.command("compare")
def compare_logs(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="The reference log, then the log to check against it: each a file, a Parquet "
            "log or a quoted glob ('a/routes.dp*.jsonl': a run's data-parallel ranks are one log).",
            show_default=False,
        ),
    ],
    as_json: AsJson("Print the comparison as JSON.") = False,
    show: Annotated[
        int, typer.Option(min=0, help="How many diverging requests to list with their first token.")
    ] = 10,
) -> None:
    """Do two logs of the same prompts route the same? (new kernel, dtype, GPU)

    Joins routes on (req_id, token_idx, layer): identical top-k sets, top-1,
    weights where the sets agree, routes in one log only, each request's first
    diverging token; per layer too. Exit 0 (2 when a log cannot be read).
    """
    from moeprof.analysis import compare as lib
    from moeprof.analysis.sources import open_logs
    from moeprof.render.compare import print_comparison

    try:
        opened = open_logs(list(logs))
        if len(opened) != 2:
            names = ", ".join(str(log.path) for log in opened)
            raise UserError(
                f"compare needs two logs, these paths name {len(opened)} ({names}); quote a "
                "glob to give one run's data-parallel ranks as one side"
            )
        report = lib.compare_logs(opened[0], opened[1], show=show)
    except UserError as e:
        fail(_escape(str(e)), 2)
    _print_warnings(report.warnings)
    if as_json:
        typer.echo(lib.report_json(report))
    else:
        print_comparison(report, console)


@app.command("export")
def export_log(
    log: Annotated[
        Path,
        typer.Argument(
            help="The log: JSONL, or Parquet (a directory of parts such as routes.parquet, or "
            "one Parquet file).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write: a name like routes.parquet gets Parquet (a directory of parts, "
            "as the hook writes), one like routes.jsonl JSONL; any other name the other form "
            "than LOG's.",
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            metavar="DIR",
            help="Also (or only) write the CSV set to DIR: expert_load.csv, coselection.csv, "
            "step_load.csv and summary.json.",
        ),
    ] = None,
    single_file: Annotated[
        bool, typer.Option(help="Parquet as one file instead of a directory of parts.")
    ] = False,
    num_experts: NumExperts("Experts per layer when the meta does not say (--csv).") = None,
    force: Force("Overwrite existing output.") = False,
) -> None:
    """Convert a log between JSONL and Parquet (routes bit for bit), or write a CSV set.

    Parquet -> JSONL gives the bytes the hook would have written for the same routes. Memory
    stays flat; exit 2 when the log cannot be read or the output exists (without --force).
    """
    from moeprof import export as lib
    from moeprof.render.generate import export_progress

    if out is None and csv is None:
        fail("give --out FILE, --csv DIR, or both")
    try:
        if out is not None:
            with export_progress(err_console, f"{log} -> {out}") as progress:
                result = lib.export(
                    log, out, single_file=single_file, force=force, on_progress=progress
                )
            parts = f" in {result.parts} parts" if result.parts > 1 else ""
            closed = "" if result.complete else " (the log has no closing record: cut short?)"
            console.print(
                f"wrote {result.routes:,} routes to [bold]{_escape(str(out))}[/] "
                f"({result.format}{parts}){closed}",
                highlight=False,
            )
        if csv is not None:
            with export_progress(err_console, f"{log} -> {csv}/") as progress:
                written = lib.export_csv(
                    log, csv, force=force, num_experts=num_experts, on_progress=progress
                )
            console.print(
                f"wrote {', '.join(p.name for p in written)} to [bold]{_escape(str(csv))}[/]",
                highlight=False,
            )
    except UserError as e:
        fail(_escape(str(e)), 2)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="Hub id or local folder; 'tiny' for the embedded model (served as 'tiny').",
            show_default=False,
        ),
    ],
    log: Annotated[
        Path,
        typer.Option(help="Routing log to write (a name like routes.parquet: a Parquet log)."),
    ] = Path("moe_routes.jsonl"),
    log_layer: Annotated[
        str,
        typer.Option(
            metavar="LAYERS",
            help="Decoder layers to log: an index (12), a list (0,12,23), ranges (0-11,23) or "
            "'all'.",
        ),
    ] = "0",
    force: Force("Overwrite an existing log.") = False,
) -> None:
    """Start vLLM's OpenAI-compatible server with the routing hook on.

    Every option moeprof does not know goes to vLLM (--port, --max-model-len, ...), e.g.
    `moeprof serve tiny --log routes.jsonl --port 8000 --enforce-eager`. Requests are logged
    under vLLM's request ids: a completion's id plus "-P", P the prompt's index ("-0" for one
    prompt); a chat completion's id as is; with n > 1, "C_" before that, C the choice's index
    (README: "Which req_id a served request is logged under"). Ctrl-C or SIGTERM
    stops the server; moeprof then says whether the log is complete and exits with the
    server's code (1 when the hook refused to start: its one line is printed).
    """
    import signal as signals

    from moeprof import serve as lib

    try:
        job = lib.prepare(model, log=log, layer=log_layer, force=force, vllm_args=ctx.args)
    except UserError as e:
        fail(_escape(str(e)), 2)
    err_console.print(
        f"moeprof: serving {job.model_label} at {job.address} (vLLM's OpenAI API); logging "
        f"{_layers_label(job.layers)} to [bold]{_escape(str(log.absolute()))}[/]",
        highlight=False,
        soft_wrap=True,
    )

    def show(line: str) -> None:
        print(line, flush=True)

    def stopping(signum: int) -> None:
        err_console.print(
            f"moeprof: {signals.Signals(signum).name}: stopping the server", highlight=False
        )

    try:
        result = lib.run(job, show, stopping)
    except UserError as e:
        fail(_escape(str(e)), 2)
    if result.refusal is not None:
        fail(_escape(result.refusal), 1)
    if result.stopped is not None:
        err_console.print(f"[bold red]error:[/] {_escape(result.stopped)}", highlight=False)
    if result.end is not None:
        dropped = result.end.get("dropped") or 0
        note = f", {dropped:,} dropped" if dropped else ""
        err_console.print(
            f"moeprof: log complete: {_escape(str(log))} ({result.end.get('routes', 0):,} routes"
            f"{note})",
            highlight=False,
        )
    elif result.log_exists:
        err_console.print(
            f"[yellow]warning:[/] {_escape(str(log))} is not closed cleanly (no closing "
            "record): the server was killed or crashed; the log holds what was written before",
            highlight=False,
        )
    if result.returncode != 0 and result.reason:
        err_console.print(
            f"[bold red]error:[/] the server exited with code {result.returncode}: "
            f"{_escape(result.reason)}",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(result.returncode)


def main() -> None:
    app()
