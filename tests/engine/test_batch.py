"""Batch predictions on this machine (worker/engine/batch.py and `graft predict MODEL DIR --csv`), with a really
trained (tiny) model: the CSV's columns and rows agree with the Predictor's answers, a corrupt image is reported
and the rest finish, the images are sorted into one folder per predicted class plus abstained/, a stop request
is honoured between chunks."""
from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app as cli_app
from domain.callbacks import Callbacks
from domain.spec import RunSpec
from worker.engine.batch import columns, list_images, predict_folder
from worker.engine.predict import Predictor
from worker.engine.runner import run


@pytest.fixture(scope="module")
def model(tiny_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch-run")
    res = run(RunSpec(strategy="features", epochs=2, image_size=64, batch_size=8), tiny_slice, out, None)
    assert res.status == "completed"
    return out / "model.pt"


@pytest.fixture(scope="module")
def folder(tiny_slice, tmp_path_factory) -> Path:
    """Unlabelled images in nested folders, a corrupt one, a note and junk."""
    d = tmp_path_factory.mktemp("unlabelled")
    vals = sorted((tiny_slice / "val").rglob("*.jpg"))
    for i, p in enumerate(vals):
        dest = d / ("a" if i % 2 else "b/c") / f"img{i}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 30, 200)).save(buf, "PNG")
    (d / "plain.png").write_bytes(buf.getvalue())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    (d / "__MACOSX").mkdir()
    (d / "__MACOSX" / "._img0.jpg").write_bytes(b"junk")
    (d / ".DS_Store").write_bytes(b"junk")
    return d


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Recorder(Callbacks):
    def __init__(self, stop_after: int | None = None):
        self.messages: list[str] = []
        self.progress: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def on_message(self, message: str) -> None:
        self.messages.append(message)

    def on_progress(self, p) -> None:
        assert p.stage == "predict" and 0 < p.fraction <= 1
        self.progress.append((p.done, p.total))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.progress) >= self.stop_after


def test_a_folder_gives_a_csv_and_a_sorted_zip(model, folder, tmp_path):
    images, other = list_images(folder)
    assert "broken.jpg" in images and other == ["notes.txt"] and not any("MACOSX" in i for i in images)
    cb = Recorder()
    res = predict_folder(model, folder, tmp_path / "r.csv", zip_path=tmp_path / "r.zip", top_k=3, callbacks=cb,
                         chunk=3, batch_size=2)
    n = len(images)
    assert res.status == "completed" and res.images == n and res.unreadable == 1 and res.predicted == n - 1
    assert res.top_k == 2 and res.classes == ["ants", "bees"]  # top-k capped at the number of classes
    assert cb.progress[-1] == (n, n) and len(cb.progress) == -(-n // 3)
    assert any("could not read broken.jpg" in m for m in cb.messages)
    assert any("ignored 1 file(s) that are not images (notes.txt)" in m for m in cb.messages)

    with open(tmp_path / "r.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == columns(2) == ["file", "label", "probability", "abstained", "top1", "p1", "top2", "p2", "error"]
    rows = _rows(tmp_path / "r.csv")
    assert [r["file"] for r in rows] == images  # every image, in order, by its path inside the folder
    broken = next(r for r in rows if r["file"] == "broken.jpg")
    assert broken["label"] == "" and broken["abstained"] == "" and broken["error"]
    # the same answers as the predictor's, image by image
    expected = {r["file"]: r for r in Predictor(model).predict_sources([(i, folder / i) for i in images], top_k=2)}
    for r in rows:
        e = expected[r["file"]]
        if "error" in e:
            continue
        assert r["label"] == r["top1"] == e["top"][0]["class"] and r["error"] == ""
        assert abs(float(r["probability"]) - e["top"][0]["probability"]) < 1e-5
        assert abs(float(r["p1"]) + float(r["p2"]) - 1) < 1e-4 and r["top2"] != r["top1"]
        assert r["abstained"] == ("true" if e["abstained"] else "false")

    with zipfile.ZipFile(tmp_path / "r.zip") as zf:
        names = zf.namelist()
    assert len(names) == n - 1 and "notes.txt" not in " ".join(names)
    for r in rows:
        if r["error"]:
            continue
        where = "abstained" if r["abstained"] == "true" else r["label"]
        assert f"{where}/{r['file']}" in names
    assert sum(res.counts.values()) == n - 1 and res.counts["abstained"] == res.abstained


def test_a_threshold_of_one_abstains_on_everything_and_a_stop_is_honoured(model, folder, tmp_path):
    res = predict_folder(model, folder, tmp_path / "r.csv", sort_into=tmp_path / "sorted", confidence_threshold=1.0)
    # only an image the model is sure of to float32 precision (probability 1.0) is still answered
    answered = [r for r in _rows(tmp_path / "r.csv") if r["label"] and r["abstained"] == "false"]
    assert all(float(r["probability"]) >= 0.9999995 for r in answered), answered
    assert res.abstained == res.predicted - len(answered) and res.confidence_threshold == 1.0
    assert res.counts["abstained"] == res.abstained > 0
    assert len([p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]) == res.predicted
    assert (tmp_path / "sorted" / "abstained" / "b" / "c").is_dir()  # the folders inside are kept

    cb = Recorder(stop_after=1)
    res = predict_folder(model, folder, tmp_path / "s.csv", chunk=2, callbacks=cb)
    assert res.status == "stopped" and cb.progress == [(2, res.images)] and res.predicted + res.unreadable == 2


def test_graft_predict_a_folder_into_a_csv(model, folder, tmp_path):
    runner = CliRunner()
    out, sort_into = tmp_path / "out.csv", tmp_path / "sorted"
    r = runner.invoke(cli_app, ["predict", str(model), str(folder), "--csv", str(out), "--sort-into", str(sort_into),
                                "--top-k", "1", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    n = len(list_images(folder)[0])
    assert summary["images"] == n and summary["unreadable"] == 1 and summary["csv"] == str(out)
    rows = _rows(out)
    assert list(rows[0]) == columns(1) and len(rows) == n
    copied = [p for p in sort_into.rglob("*") if p.is_file()]
    assert len(copied) == n - 1 and {p.relative_to(sort_into).parts[0] for p in copied} <= {"ants", "bees", "abstained"}
    # nothing readable: exit status 1, each image reported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    r = runner.invoke(cli_app, ["predict", str(model), str(bad), "--csv", str(tmp_path / "bad.csv")])
    assert r.exit_code == 1 and "could not read x.jpg" in r.output and "0 predicted" in r.output
    # a folder needs --csv or --sort-into
    r = runner.invoke(cli_app, ["predict", str(model), str(folder)])
    assert r.exit_code == 2 and "--csv" in r.output
