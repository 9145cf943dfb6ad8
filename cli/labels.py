"""`graft label-issues DATA_DIR`: the images whose labels are probably wrong (worker/engine/labels.py).

Importing this module must stay cheap and torch-free, like cli/engine.py: the command imports the engine in
its body.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cli.engine import _fail, _fail_options, default_cache_dir


def _default(name: str):
    from domain.spec import LabelIssueSpec

    return LabelIssueSpec.model_fields[name].default


def label_issues(
    data_dir: Path = typer.Argument(..., help="Folder with train/ and val/ (or train/ only, or class folders)."),
    backbone: str = typer.Option(_default("backbone"), help="See `graft backbones`."),
    image_size: int | None = typer.Option(None, help="Input size (default: the backbone's)."),
    augment: str = typer.Option(_default("augment"), help="none | light | standard (the train images' views)."),
    feature_views: int = typer.Option(_default("feature_views"), help="Augmented views per train image."),
    folds: int = typer.Option(_default("folds"), help="Cross-validation folds."),
    rank_by: str = typer.Option(_default("rank_by"),
                                help="self_confidence | normalized_margin | confidence_weighted_entropy"),
    duplicate_threshold: float = typer.Option(_default("duplicate_threshold"),
                                              help="Cosine similarity above which two images are near-duplicates."),
    max_issues: int = typer.Option(_default("max_issues"), help="Report at most this many suspects."),
    val_fraction: float = typer.Option(_default("val_fraction"), help="Val share when the data has no val split."),
    seed: int = typer.Option(_default("seed")),
    show: int = typer.Option(30, help="Rows of the table (without --json)."),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default $GRAFT_CACHE_DIR, else <$GRAFT_DATA_DIR "
                                                     "or graft-data>/cache)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON line (last line of stdout)."),
) -> None:
    """Find images that are probably filed under the wrong class: cross-validated linear classifiers on the
    frozen features (cached: a probe or `graft train --strategy features` with the same settings shares them),
    confident learning to rank the suspects, and duplicates filed under different classes."""
    from pydantic import ValidationError

    from domain.errors import GraftError
    from domain.spec import LabelIssueSpec

    try:
        spec = LabelIssueSpec(backbone=backbone, image_size=image_size, augment=augment, feature_views=feature_views,
                              folds=folds, rank_by=rank_by, duplicate_threshold=duplicate_threshold,
                              max_issues=max_issues, val_fraction=val_fraction, seed=seed)
    except ValidationError as e:
        _fail_options(e)
    from cli.progress import RichCallbacks
    from worker.engine.labels import find_label_issues

    cb = RichCallbacks(quiet=False)
    try:
        with cb:
            report = find_label_issues(data_dir, spec, None if no_cache else (cache_dir or default_cache_dir()), cb,
                                       device=device)
    except GraftError as e:
        _fail(str(e))
    out = report.model_dump(mode="json")
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        _print_issues(out, show)
    if report.status == "stopped":
        raise typer.Exit(1)


def _print_issues(out: dict, show: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    t = Table(title=f"{out['n_flagged']} suspect label(s) among {out['n_images']} images, most likely wrong first "
                    f"({out['method']}, {out['folds']} folds, {out['seconds']:.1f}s on {out['device']})")
    for col in ("#", "file", "given", "suggested", "score", "why"):
        t.add_column(col, justify="right" if col in ("#", "score") else "left")
    for n, i in enumerate(out["issues"][:show], 1):
        why = i["reason"].replace("_", " ")
        if i.get("other_file"):
            why += f" of {i['other_file']} ({i['similarity']:.3f})"
        elif i.get("given_probability") is not None:
            why += f" (p given {i['given_probability']:.2f}, p suggested {i['suggested_probability']:.2f})"
        t.add_row(str(n), escape(i["file"]), escape(i["given"]), escape(i["suggested"]), f"{i['score']:.3f}",
                  escape(why))
    c.print(t)
    if len(out["issues"]) > show:
        c.print(f"[dim]{len(out['issues']) - show} more: --show N, or --json for all[/]")
    if out.get("oof_acc") is not None:
        c.print(f"[dim]out-of-fold accuracy against the given labels: {100 * out['oof_acc']:.1f}%[/]")


def register(app: typer.Typer) -> None:
    app.command("label-issues")(label_issues)
