"""`graft predict MODEL DIR --csv out.csv [--sort-into DIR]`: batch predictions over folders of images on this
machine, with a progress bar; the same engine code (worker/engine/batch.py) and CSV as the server's batch jobs.
Unreadable images are reported and the rest finish; the exit status is 1 only when no image could be read."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import typer

from cli.progress import RichCallbacks
from domain.callbacks import BatchProgress


class BatchBar(RichCallbacks):
    def on_progress(self, p: BatchProgress) -> None:
        super().on_progress(dataclasses.replace(p, stage="predicting images"))


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def collect(paths: list[Path]) -> tuple[list[tuple[str, Path]], list[str]]:
    """(name, path) of every image: a folder's by their path inside it (prefixed by the folder's name when
    there are several arguments), a file by its name; and the files that are not images."""
    from worker.engine.batch import list_images

    items: list[tuple[str, Path]] = []
    ignored: list[str] = []
    for p in paths:
        if p.is_dir():
            images, other = list_images(p)
            prefix = f"{p.resolve().name}/" if len(paths) > 1 else ""
            items += [(prefix + rel, p / rel) for rel in images]
            ignored += [prefix + rel for rel in other]
        elif p.is_file():
            items.append((p.name, p))
        else:
            _fail(f"{p}: no such file or folder")
    return items, ignored


def predict_batch(model: Path, paths: list[Path], csv_path: Path | None, sort_into: Path | None, top_k: int,
                  confidence_threshold: float | None, as_json: bool) -> None:
    from domain.errors import GraftError
    from worker.engine.batch import predict_images

    if csv_path is None and sort_into is None:
        _fail("a folder was given: write the predictions with --csv OUT.csv (and/or --sort-into DIR, to copy the "
              "images into one folder per predicted class)")
    items, ignored = collect(paths)
    if not items:
        _fail(f"no images in {', '.join(map(str, paths))}" + (f" (only {len(ignored)} other files)" if ignored
                                                               else ""), 1)
    out_csv = csv_path if csv_path is not None else Path(sort_into or ".") / "results.csv"
    bar = BatchBar(quiet=as_json)
    try:
        with bar:
            res = predict_images(model, items, out_csv, sort_into=sort_into, top_k=top_k,
                                 confidence_threshold=confidence_threshold, callbacks=bar, ignored=ignored)
    except GraftError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps({**res.to_json(), "csv": str(out_csv),
                                     "sorted_into": str(sort_into) if sort_into else None}) + "\n")
    else:
        folders = ", ".join(f"{k} {v}" for k, v in res.counts.items() if v)
        typer.echo(f"{res.images} images: {res.predicted} predicted ({res.abstained} abstained), {res.unreadable} "
                   f"unreadable; CSV: {out_csv}" + (f"; sorted into {sort_into} ({folders})" if sort_into else ""))
    if res.predicted == 0:
        raise typer.Exit(1)
