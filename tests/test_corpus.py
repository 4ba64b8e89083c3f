"""Corpus reading and cleaning: BabyLM files, speaker tags, and every kind of bad input named clearly."""

from pathlib import Path

import pytest

from kdcache.config import CleaningConfig, Config, CorpusConfig, run_paths
from kdcache.cache.schema import sha256_file
from kdcache.precompute.corpus import CorpusError, build_corpus, clean_line, expand_entries, read_lines, read_split

CLEAN = CleaningConfig()


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("*MOT:\twhat's that ?", "what's that ?"),
        ("*CHI: doggie .", "doggie ."),
        ("A:\tI'm sure they are.", "I'm sure they are."),
        ("B: Uh-huh.", "Uh-huh."),
        ("  lots \t of   space  ", "lots of space"),
        ("ﬁne ＡＢＣ", "fine ABC"),  # NFKC: ligature and full-width letters
        ("A:B is a ratio", "A:B is a ratio"),  # no TAB/space after the colon: not a tag
        ("Note: A: stays", "Note: A: stays"),  # tags only at the start of a line
        ("C: not a switchboard speaker", "C: not a switchboard speaker"),
    ],
)
def test_clean_line(raw, cleaned):
    assert clean_line(raw, CLEAN) == cleaned


def test_cleaning_can_be_switched_off():
    off = CleaningConfig(nfkc=False, strip_speaker_tags=False, collapse_whitespace=False, drop_empty_lines=False)
    assert clean_line("*MOT:\tﬁne  x ", off) == "*MOT:\tﬁne  x "


def test_reads_real_switchboard_without_speaker_tags(shared_data):
    switchboard = shared_data / "babylm" / "train_10M" / "switchboard.train"
    split = read_split([str(switchboard)], CLEAN, "test")
    assert len(split.lines) == 18000
    assert not any(line.startswith(("A:", "B:")) for line in split.lines)
    assert split.lines[0] == "I'm sure they are."
    assert split.sources == {str(switchboard): sha256_file(switchboard)}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_means_its_split_files_sorted(tmp_path):
    for name in ["b.dev", "a.train", "c.test", "notes.md"]:
        write(tmp_path / "d" / name, f"{name}\n".encode())
    files = expand_entries([str(tmp_path / "d")], "test")
    assert [f.name for f in files] == ["a.train", "b.dev", "c.test"]
    assert read_split([str(tmp_path / "d")], CLEAN, "test").lines == ["a.train", "b.dev", "c.test"]


def test_line_endings_bom_and_blank_lines(tmp_path):
    path = write(tmp_path / "x.train", "\ufeffone\r\n\r\n  \ntwo\u2028half\nthree".encode())
    # U+2028 is not a line break in this format; whitespace collapsing turns it into a space
    assert read_lines(path, CLEAN) == ["one", "two half", "three"]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CorpusError, match=rf"{tmp_path}/nope: not found \(from corpus.train\)"):
        expand_entries([str(tmp_path / "nope")], "corpus.train")


def test_empty_directory_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "readme.txt", b"not a split file\n")
    with pytest.raises(CorpusError, match=rf"{tmp_path}/empty: directory .* has no \*.train"):
        expand_entries([str(tmp_path / "empty")], "corpus.train")


def test_empty_file_is_named(tmp_path):
    path = write(tmp_path / "e.train", b"")
    with pytest.raises(CorpusError, match=rf"{path}: file is empty"):
        read_lines(path, CLEAN)


def test_blank_only_file_is_named(tmp_path):
    path = write(tmp_path / "e.train", b"\n  \nA:\t\n")
    with pytest.raises(CorpusError, match=rf"{path}: no text left after cleaning"):
        read_lines(path, CLEAN)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.train", b"fine\nalso fine\ncaf\xe9 latin-1\nmore\n")
    with pytest.raises(CorpusError, match=rf"{path}: line 3: not valid UTF-8"):
        read_lines(path, CLEAN)


def test_build_corpus_writes_cleaned_splits(tmp_path):
    train = write(tmp_path / "data" / "t.train", b"A:\thello  there\nB:\tgeneral kenobi\n")
    dev = write(tmp_path / "data" / "d.dev", b"*MOT:\tlook .\n")
    cfg = Config(name="c", corpus=CorpusConfig(kind="babylm", train=[str(train)], dev=[str(dev)]), source_path="c.yaml")
    paths = run_paths(cfg, tmp_path / "runs")
    corpus = build_corpus(cfg, paths)
    assert corpus["train"].lines == ["hello there", "general kenobi"]
    assert corpus["dev"].sources == {str(dev): sha256_file(dev)}
    assert (paths.corpus / "train.txt").read_text() == "hello there\ngeneral kenobi\n"
    assert (paths.corpus / "dev.txt").read_text() == "look .\n"
    assert sorted(p.name for p in paths.corpus.iterdir()) == ["dev.txt", "train.txt"]  # no temp files left


def test_babylm_without_dev_is_named(tmp_path):
    train = write(tmp_path / "t.train", b"hello\n")
    cfg = Config(name="c", corpus=CorpusConfig(kind="babylm", train=[str(train)]), source_path="c.yaml")
    with pytest.raises(CorpusError, match=r"c.yaml: corpus.dev lists no files"):
        build_corpus(cfg, run_paths(cfg, tmp_path / "runs"))


def test_demo_corpus_and_pairs(tmp_path):
    cfg = Config(name="d", corpus=CorpusConfig(demo_train_sentences=50, demo_dev_sentences=20, demo_pairs_per_phenomenon=3))
    paths = run_paths(cfg, tmp_path)
    corpus = build_corpus(cfg, paths)
    assert (len(corpus["train"].lines), len(corpus["dev"].lines)) == (50, 20)
    assert corpus["train"].lines[:20] != corpus["dev"].lines  # different seeds
    assert (paths.corpus / "dev.txt").read_text().splitlines() == corpus["dev"].lines
    (source, digest), = corpus["train"].sources.items()
    assert "seed=1234" in source and digest == sha256_file(paths.corpus / "train.txt")
    assert sorted(paths.pairs.glob("*.jsonl")), "demo minimal pairs were not written"
    assert build_corpus(cfg, paths)["train"].lines == corpus["train"].lines  # deterministic
