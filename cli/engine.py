"""Engine commands of the `graft` CLI: train, probe, backbones, weights import, predict, export.

Importing this module must stay cheap and torch-free (the web image has no torch): every command
imports the engine inside its body.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from domain.exports import AFTER_TRAINING

weights_app = typer.Typer(help="Manage pretrained weights (for servers without internet access).",
                          no_args_is_help=True)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _fail_options(e: Any) -> None:
    """A spec's validation error (pydantic) said as the command-line options it came from."""
    _fail("; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-') or 'options'}: {err['msg']}"
                    for err in e.errors()))


def default_cache_dir() -> Path:
    """The same cache as the server's (domain.paths): $GRAFT_CACHE_DIR, else <$GRAFT_DATA_DIR or graft-data>/cache."""
    from domain.paths import default_cache_dir as shared_default

    return shared_default()


def _default(name: str):
    """RunSpec's default for an option: the one definition (the API and the pages use it too)."""
    from domain.spec import RunSpec

    return RunSpec.model_fields[name].default


def train(
    data_dir: Path = typer.Argument(..., help="Folder with train/ and val/ (or train/ only, or class folders)."),
    backbone: str = typer.Option(_default("backbone"), help="See `graft backbones`."),
    strategy: str = typer.Option(_default("strategy"), help="features | finetune_last:N | full | two_stage"),
    epochs: int | None = typer.Option(_default("epochs"), min=1,
                                      help="Total epochs (the most, with early stopping). Default: features "
                                           "trains until val loss stops improving (at most 200); others 10."),
    lr: float | None = typer.Option(None, help="Base learning rate (default depends on the strategy)."),
    batch_size: int = typer.Option(_default("batch_size"), min=1),
    image_size: int | None = typer.Option(None, help="Input size (default: the backbone's)."),
    augment: str = typer.Option(_default("augment"), help="none | light | standard"),
    seed: int = typer.Option(_default("seed")),
    out: Path | None = typer.Option(None, help="Output folder (default: runs/<backbone>-<time>)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random init instead of ImageNet weights."),
    head_epochs: int | None = typer.Option(None, help="two_stage: epochs of the head-only stage."),
    optimizer: str = typer.Option(_default("optimizer"), help="adamw | sgd"),
    schedule: str = typer.Option(_default("schedule"), help="cosine | step | constant"),
    patience: int | None = typer.Option(_default("patience"), help="Early stopping patience on val loss (0 disables)."),
    label_smoothing: float | None = typer.Option(_default("label_smoothing"),
                                                 help="Default: 0.1; 0 for features (a head on frozen features)."),
    class_weighting: str = typer.Option(_default("class_weighting"),
                                        help="auto | balanced | none: balanced weighs each class in the loss "
                                             "inversely to its train images (auto: when the largest class has "
                                             "over 3x the smallest's)."),
    feature_views: int = typer.Option(_default("feature_views"), help="Frozen backbone: augmented views per train image."),
    val_fraction: float = typer.Option(_default("val_fraction"), help="Val share when the data has no val split."),
    max_train_images: int | None = typer.Option(None, help="Train on a stratified subset."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/last.pt."),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default $GRAFT_CACHE_DIR, else <$GRAFT_DATA_DIR or graft-data>/cache)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    devices: int = typer.Option(_default("devices"), min=1, max=64,
                                help="Data-parallel on this many GPUs (CPU: processes), one process each."),
    search: int | None = typer.Option(None, "--search", min=1, max=200, metavar="TRIALS",
                                      help="Search the head's lr, weight decay, dropout and label smoothing in this "
                                           "many trials on the cached features (Optuna; the first trial: the options "
                                           "given), then train with the best; phases that unfreeze layers take their "
                                           "lr from a range test."),
    search_timeout: float | None = typer.Option(None, help="--search: start no trial after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line (last line of stdout)."),
) -> None:
    """Fine-tune a pretrained backbone on a folder of labelled images."""
    from pydantic import ValidationError

    from domain.errors import GraftError
    from domain.spec import RunSpec

    try:
        spec = RunSpec(backbone=backbone, pretrained=not no_pretrained, strategy=strategy, epochs=epochs, lr=lr,
                       batch_size=batch_size, image_size=image_size, augment=augment, seed=seed,
                       head_epochs=head_epochs, optimizer=optimizer, schedule=schedule,
                       patience=patience or None, label_smoothing=label_smoothing, feature_views=feature_views,
                       class_weighting=class_weighting,
                       val_fraction=val_fraction, max_train_images=max_train_images,
                       devices=devices, search={"trials": search, "timeout_s": search_timeout} if search else None)
    except ValidationError as e:
        _fail_options(e)
    if search_timeout is not None and not search:
        _fail("--search-timeout: give --search TRIALS too")
    out = out or Path("runs") / f"{backbone}-{strategy.replace(':', '')}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    from cli.progress import RichCallbacks
    from worker.engine.runner import run

    cb = RichCallbacks(quiet=False)
    try:
        with cb:
            result = run(spec, data_dir, out, cb, resume=resume, cache_dir=None if no_cache else
                         (cache_dir or default_cache_dir()), device=device)
    except GraftError as e:
        _fail(str(e))
    summary = result.summary().to_json()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        cb.print_summary(result)
    if result.status == "stopped":
        raise typer.Exit(1)


def probe(
    data_dir: Path = typer.Argument(..., help="Folder with train/ and val/ (or train/ only, or class folders)."),
    backbones: str | None = typer.Option(None, help="Comma-separated backbones (default: every one whose "
                                                       "pretrained weights are on this machine)."),
    advise: bool = typer.Option(False, "--advise", help="Also measure how far the images are from ImageNet (a "
                                                        "short fine-tune on a sample) and recommend a strategy."),
    random_init: bool = typer.Option(False, "--random-init", help="Also probe each backbone from random weights "
                                                                  "(a baseline: what pretraining is worth)."),
    image_size: int | None = typer.Option(None, help="Input size (default: each backbone's)."),
    seed: int = typer.Option(0),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default $GRAFT_CACHE_DIR, else <$GRAFT_DATA_DIR or graft-data>/cache)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line (last line of stdout)."),
) -> None:
    """Rank backbones on a dataset: frozen features (cached: `graft train --strategy features` reuses them), a
    linear classifier on them, val accuracy, time and model size."""
    from pydantic import ValidationError

    from domain.errors import GraftError
    from domain.spec import ProbeSpec

    try:
        spec = ProbeSpec(backbones=[b for b in backbones.split(",")] if backbones else None, advise=advise,
                         random_init=random_init, image_size=image_size, seed=seed)
    except ValidationError as e:
        _fail_options(e)
    from cli.progress import RichCallbacks
    from worker.engine.probe import probe as run_probe

    cb = RichCallbacks(quiet=False)
    try:
        with cb:
            result = run_probe(data_dir, spec, None if no_cache else (cache_dir or default_cache_dir()), cb,
                               device=device)
    except GraftError as e:
        _fail(str(e))
    out = result.model_dump(mode="json")
    if advise:
        from domain.advice import recommend_strategy

        measured = result.measured.to_json() if result.measured else None
        out["advice"] = recommend_strategy(result.counts, measured).to_dict()
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        _print_leaderboard(out)
    if result.status == "stopped" or not any(r.error is None for r in result.rows):
        raise typer.Exit(1)


def _print_leaderboard(out: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    t = Table(title=f"Backbones ranked by val accuracy of a linear probe ({out['seconds']:.1f}s on {out['device']})")
    for col in ("rank", "backbone", "val acc", "val loss", "time", "features", "params", "size"):
        t.add_column(col, justify="left" if col == "backbone" else "right")
    for r in out["rows"]:
        name = r["backbone"] + ("" if r.get("pretrained", True) else " (random init)")
        if r.get("error"):
            t.add_row("-", escape(name), f"[red]failed[/]: {escape(r['error'][:80])}", "", "", "", "", "")
            continue
        t.add_row(str(r["rank"]), escape(name), f"{100 * r['val_acc']:.1f}%", f"{r['val_loss']:.3f}",
                  f"{r['seconds']:.1f}s", "cached" if r["cached"] else f"{r['feature_seconds']:.1f}s",
                  f"{r['params'] / 1e6:.1f}M", f"{r['size_mb']:.1f} MB")
    c.print(t)
    m, a = out.get("measured"), out.get("advice")
    if a:
        c.print(f"[bold]Recommended strategy: {a['strategy']}[/]")
        c.print(escape(a["reason"]))
    elif m is None:
        c.print("[dim]--advise also recommends a training strategy[/]")


def backbones(as_json: bool = typer.Option(False, "--json")) -> None:
    """List every backbone and whether its pretrained weights are available on this machine."""
    from domain.catalog import CATALOG

    rows: list[dict[str, Any]] = [{"name": e.name, "description": e.description, "params": e.params,
                                   "image_size": e.image_size,
             "pretrained_available": e.weights_available(), "weights_file": str(e.weights_path()),
             "weights_url": e.weights_url} for e in CATALOG.values()]
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Backbones")
    for col in ("name", "params", "size", "weights here", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], f"{r['params'] / 1e6:.1f}M", str(r["image_size"]),
                  "[green]yes[/]" if r["pretrained_available"] else "[red]no[/] (graft weights import)",
                  r["description"])
    Console().print(t)


@weights_app.command("import")
def weights_import(
    file: Path = typer.Argument(..., help="The downloaded .pth file (official torchvision weights)."),
    backbone: str = typer.Option(..., help="Which backbone the file is for."),
) -> None:
    """Check a downloaded weights file (sha256, tensor shapes) and put it in the TORCH_HOME cache."""
    from domain.errors import GraftError
    from worker.engine.backbones import import_weights

    try:
        target = import_weights(file, backbone)
    except GraftError as e:
        _fail(str(e))
    typer.echo(f"imported {file} as {target}")


def predict(
    model: Path = typer.Argument(..., help="A model.pt written by `graft train`."),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of images (with --csv)."),
    top_k: int = typer.Option(3, min=1),
    confidence_threshold: float | None = typer.Option(
        None, min=0.0, max=1.0, help="Abstain below this calibrated confidence (default: the model's operating point)."),
    explain: Path | None = typer.Option(None, help="Write a heatmap of where the model looked for each image "
                                                  "into this folder (<image name>.heatmap.png)."),
    as_json: bool = typer.Option(False, "--json"),
    csv: Path | None = typer.Option(None, "--csv", help="Write one row per image into this CSV (file, label, "
                                    "probability, abstained, top-k, error), with a progress bar: for folders."),
    sort_into: Path | None = typer.Option(None, "--sort-into", help="Copy the images into this folder, one "
                                          "folder per predicted class plus abstained/."),
) -> None:
    """Classify images with a trained model: calibrated probabilities, and "none of these" (abstained) when an
    image is unlike the training images or the model is not sure enough. With --csv (or --sort-into), whole
    folders: unreadable images are reported and the rest finish."""
    import base64

    if csv is not None or sort_into is not None or any(p.is_dir() for p in images):
        from cli.batch import predict_batch

        predict_batch(model, images, csv, sort_into, top_k, confidence_threshold, as_json)
        return

    from domain.errors import GraftError
    from worker.engine.predict import Predictor

    try:
        res = Predictor(model).predict(images, top_k=top_k, explain=explain is not None,
                                       confidence_threshold=confidence_threshold)
    except GraftError as e:
        _fail(str(e))
    if explain is not None:
        explain.mkdir(parents=True, exist_ok=True)
        for r in res:
            if r.get("heatmap_png"):
                dest = explain / f"{Path(r['file']).name}.heatmap.png"
                dest.write_bytes(base64.b64decode(r["heatmap_png"]))
                r["heatmap_file"] = str(dest)
                del r["heatmap_png"]
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
        return
    for r in res:
        if "error" in r:
            typer.echo(f"{r['file']}: error: {r['error']}")
            continue
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
        note = f"  [none of these: {r.get('abstain_reason') or 'abstained'}]" if r.get("abstained") else ""
        typer.echo(f"{r['file']}: {top}{note}" + (f"  (heatmap: {r['heatmap_file']})" if "heatmap_file" in r else ""))


def export(
    model: Path = typer.Argument(..., help="A model.pt written by `graft train`."),
    data: Path | None = typer.Option(None, help="The dataset folder: its val images check the ONNX export "
                                                   "(default: random inputs)."),
    out: Path | None = typer.Option(None, help="Output folder (default: next to the model)."),
    formats: str = typer.Option(",".join(AFTER_TRAINING), help="Comma-separated: " + ", ".join(AFTER_TRAINING)
                                + " (each checked on the val images in its own runtime)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Export a trained model to TorchScript and ONNX (checked against PyTorch with onnxruntime), with its model card."""
    from domain.errors import GraftError
    from domain.layout import discover
    from worker.engine.export import export_all

    try:
        check = [p for p, _ in discover(data).val] if data else []
        results = export_all(model, out or model.parent, check, [f.strip() for f in formats.split(",") if f.strip()])
    except GraftError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in results]) + "\n")
    else:
        for r in results:
            extra = ""
            if r.parity:
                extra = (f" (top-1 agreement {r.parity['top1_agreement']:.4f}, max prob diff "
                         f"{r.parity['max_abs_prob_diff']:.1e} on {r.parity['images']} images)")
            typer.echo(f"{r.format}: {r.path}{extra}" if r.ok else f"{r.format}: FAILED: {r.error}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    logging.basicConfig(level=os.environ.get("GRAFT_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    app.command()(train)
    app.command()(backbones)
    app.command()(probe)
    app.command()(predict)
    app.command()(export)
    app.add_typer(weights_app, name="weights")
