"""The multi-label layout (domain.manifest, domain.layout.discover): a labels.csv read with its header variants,
inside a wrapping folder or not, with or without its split column; the seeded split keeps every label in both
parts; an empty labels field is an image with no label. Real images (tests/support/multilabel.py)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from support import multilabel

from domain.layout import IMAGE_EXTS, discover
from domain.manifest import find_manifest, read_manifest, split_rows


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return multilabel.build(tmp_path_factory.mktemp("ml") / "set", n_images=30, tile=24)


def rows_of(root: Path) -> list[list[str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.reader(f))[1:]


def write(root: Path, text: str | bytes) -> Path:
    (root / "labels.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    return root / "labels.csv"


def copy_images(src: Path, dst: Path) -> Path:
    (dst / "images").mkdir(parents=True)
    for p in sorted((src / "images").iterdir()):
        (dst / "images" / p.name).write_bytes(p.read_bytes())
    return dst


def test_the_built_set_is_read_as_multilabel(built):
    split = discover(built, val_fraction=0.25, seed=0)
    assert split.task == "multilabel" and split.multilabel
    assert split.classes == list(multilabel.LABELS)
    assert len(split.train) + len(split.val) == 30
    assert "labels.csv" in split.layout and "split 25% for val" in split.layout
    rows = {r[0]: set(filter(None, r[1].split(";"))) for r in rows_of(built)}
    for p, lbl in split.train + split.val:  # each item's label indexes its set of labels
        assert {split.classes[i] for i in split.label_sets[lbl]} == rows[split.rel(p)]
    counts = split.counts()
    for c in split.classes:  # every label in both parts
        assert counts["train"][c] > 0 and counts["val"][c] > 0
        assert counts["train"][c] + counts["val"][c] == sum(c in v for v in rows.values())
    # empty labels: a valid image with no label (every tenth image of the set)
    assert sum(1 for _, lbl in split.train + split.val if not split.label_sets[lbl]) == 3
    assert split.warnings == [] or all("very few" not in w for w in split.warnings)


def test_header_variants_wrapping_folder_and_split_column(built, tmp_path):
    rows = rows_of(built)
    root = copy_images(built, tmp_path / "zip" / "wrapped")
    body = "".join(f"{f},{lbl},{'val' if i % 4 == 3 else 'Train'}\n" for i, (f, lbl) in enumerate(rows))
    # a BOM, upper case and spaces in the header, a split column, a wrapping folder
    write(root, b"\xef\xbb\xbf" + f" File , LABELS ,Split\n{body}".encode())
    assert find_manifest(tmp_path / "zip") == root / "labels.csv"
    split = discover(tmp_path / "zip")
    assert split.root == root and "its split column" in split.layout
    assert sorted(split.rel(p) for p, _ in split.val) == sorted(f for i, (f, _) in enumerate(rows) if i % 4 == 3)
    # an empty split field: that row is split by the seed; two fields only with a split header is fine too
    m = read_manifest(write(root, "file,labels,split\n" + "".join(f"{f},{lbl},\n" for f, lbl in rows)), IMAGE_EXTS)
    assert not m.errors and all(s is None for _, _, s in m.rows)
    # labels with spaces around them and repeated within a row are one label each
    m = read_manifest(write(root, "file,labels\n" + "".join(f'{f}," {lbl.replace(";", " ; ")} ;{lbl}"\n'
                                                            for f, lbl in rows)), IMAGE_EXTS)
    assert not m.errors and m.labels == list(multilabel.LABELS)
    # not found two folders down, nor beside other entries
    (tmp_path / "zip" / "other").mkdir()
    assert find_manifest(tmp_path / "zip") is None


def test_the_seeded_split_keeps_each_label_in_both_parts():
    rows = [(f"{i}.jpg", labels, None) for i, labels in enumerate(
        [("a",), ("a",), ("a", "b"), ("b",), ("c",), ("c",), (), (), ("a",), ("a",), ("a",), ("a",)])]
    for seed in range(20):
        train, val = split_rows(rows, 0.2, seed)
        assert sorted(train + val) == list(range(len(rows))) and not set(train) & set(val)
        for lbl in "abc":
            assert any(lbl in rows[i][1] for i in train) and any(lbl in rows[i][1] for i in val), (seed, lbl)
    assert split_rows(rows, 0.2, 3) == split_rows(rows, 0.2, 3)  # seeded
    assert split_rows(rows, 0.2, 3) != split_rows(rows, 0.2, 4)
    # the manifest's own split is kept as given
    fixed = [(f, labels, "val" if i < 2 else "train") for i, (f, labels, _) in enumerate(rows)]
    assert split_rows(fixed, 0.5, 0) == (list(range(2, len(rows))), [0, 1])


def test_each_problem_is_named_with_its_fix(built, tmp_path):
    root = copy_images(built, tmp_path / "set")
    rows = rows_of(built)
    good = "".join(f"{f},{lbl}\n" for f, lbl in rows)

    def problems(text: str | bytes) -> tuple[list[str], list[str]]:
        m = read_manifest(write(root, text), IMAGE_EXTS)
        return [p.text for p in m.errors], [p.text for p in m.warnings]

    assert problems("file,labels\n" + good) == ([], [])
    errs, _ = problems(b"file,labels\nimages/0000.jpg,caf\xe9\n" + good.encode())
    assert len(errs) == 1 and "labels.csv is not UTF-8 text (byte" in errs[0] and "save it as UTF-8 CSV" in errs[0]
    errs, _ = problems("path;tags\n" + good)
    assert len(errs) == 1 and "not the header file,labels[,split]" in errs[0] and "make its first line" in errs[0]
    errs, _ = problems("file,labels\n" + good + "/etc/passwd.jpg,ant\n../up.jpg,bee\nC:/x.jpg,ant\n")
    assert len(errs) == 1 and "3 rows" in errs[0] and "absolute or outside the dataset" in errs[0]
    errs, _ = problems("file,labels,split\n" + good.replace("\n", ",train\n") + "images/0001.jpg,ant,test\n")
    assert any("split other than train or val" in e and "line 32 (test)" in e for e in errs)
    errs, _ = problems("file,labels\n" + good + "images/nope.jpg,ant\nnotes.txt,bee\n")
    assert any("1 file listed in labels.csv but not in the dataset: images/nope.jpg" in e for e in errs)
    assert any("1 row naming a file that is not an image: notes.txt" in e for e in errs)
    errs, warns = problems("file,labels\n" + good + f"{rows[0][0]},{rows[0][1]}\n")
    assert not errs and any("1 duplicated row" in w for w in warns)
    errs, _ = problems("file,labels\n" + good + f"{rows[0][0]},hand;ant;bee\n")
    assert any("listed twice with different labels" in e for e in errs)
    errs, _ = problems("file,labels\n" + good.replace(rows[1][0] + "," + rows[1][1], rows[1][0] + ",Bee ", 1)
                       .replace(rows[2][0] + "," + rows[2][1], rows[2][0] + ",wasp", 1))
    assert any("looks like a misspelling" in e and "'Bee' (1) beside 'bee'" in e for e in errs)
    assert any("fewer than 2 images: " in e and "wasp (1)" in e for e in errs)
    (root / "images" / "extra.png").write_bytes((root / "images" / "0000.jpg").read_bytes())
    errs, warns = problems("file,labels\n" + good)
    assert not errs and any("1 image in the dataset but not in labels.csv is not used: images/extra.png" in w
                            for w in warns)
    (root / "images" / "extra.png").unlink()
