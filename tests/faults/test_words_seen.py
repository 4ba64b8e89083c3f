"""Words seen and checkpoints by words: the count in metrics.jsonl, chck_* directories at the first step reaching each
count (complete Hugging Face directories, scored as the final model is), a distill killed between two of them
resuming to the same set with the same bytes, and the BabyLM track's budget refused before step 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from faultlib import Run, invoke
from kdcache.cache.schema import open_store
from kdcache.cache.words import read_word_counts
from kdcache.config import run_paths
from kdcache.student.data import cumulative_words, epoch_order
from kdcache.student.evaluate import evaluate_model
from kdcache.student.words import checkpoint_name
from test_crash import killed, metrics
from test_mismatch import edit_config, untrained, user_error

# the tiny run's student sees about 211 words a step over 12 steps (2,570 in all): a checkpoint every other step
COUNTS = [400, 800, 1200, 1600, 2000, 2400]


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def word_checkpoints(run: Run) -> dict[str, dict[str, bytes]]:
    student = run_paths(run.cfg, run.runs).student
    return {d.name: files(d) for d in sorted((student / "checkpoints").glob("chck_*"))}


def with_schedule(cached_run: Run, root: Path) -> Run:
    """A copy of the shared cached run whose student saves at COUNTS."""
    shutil.copytree(cached_run.runs, root / "runs")
    (root / "tiny.yaml").write_text(cached_run.config.read_text().replace(str(cached_run.runs), str(root / "runs")))
    return edit_config(Run(root / "tiny.yaml", root / "runs"), {"student_train.save_at_words": COUNTS})


@pytest.fixture(scope="module")
def scheduled(cached_run: Run, tmp_path_factory) -> Run:
    """Distilled once with the schedule (the tests below only read it, or write beside it)."""
    run = with_schedule(cached_run, tmp_path_factory.mktemp("scheduled"))
    assert invoke("distill", *run.args()).exit_code == 0
    return run


def test_words_seen_are_the_words_of_the_sequences_each_step_read(scheduled):
    records = metrics(run_paths(scheduled.cfg, scheduled.runs).student)
    words = read_word_counts(open_store(str(scheduled.store)), "train")
    order = epoch_order(7, 0, len(words))  # the tiny run: seed 7, 12 steps of 16 sequences, all in epoch 0
    expected = np.cumsum([words[order[16 * s : 16 * (s + 1)]].sum() for s in range(12)])
    assert [r["words_seen"] for r in records if "loss" in r] == expected.tolist()
    assert cumulative_words(words, 16, 7, 12)[1:].tolist() == expected.tolist()
    # each chck_* at the first step whose words reach its count
    for count in COUNTS:
        step = int(np.argmax(expected >= count)) + 1
        name = checkpoint_name(count)
        state = json.loads(word_checkpoints(scheduled)[name]["kdcache_training.json"])
        assert state == {"step": step, "words_seen": int(expected[step - 1]), "checkpoint_words": count}


def test_a_word_checkpoint_loads_as_is_and_scores_as_the_final_model_does(scheduled):
    """The last count is reached at the last step: its checkpoint holds the final weights, and the final model's
    evaluation code path gives it the same scores."""
    student = run_paths(scheduled.cfg, scheduled.runs).student
    last = student / "checkpoints" / "chck_2400"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(last), AutoTokenizer.from_pretrained(last)
    assert model.config.vocab_size == len(tokenizer) == 400
    pairs = scheduled.cfg.eval.minimal_pair_dirs
    got = evaluate_model(last, store=scheduled.store, pair_dirs=pairs, batch_size=32)
    want = evaluate_model(student / "model", store=scheduled.store, pair_dirs=pairs, batch_size=32)
    assert got["words_seen"] == want["words_seen"] == 2570
    assert got["minimal_pairs"][pairs[0]]["paradigms"] == want["minimal_pairs"][pairs[0]]["paradigms"]
    assert got["dev"] == want["dev"]


def test_distill_killed_between_two_word_checkpoints_resumes_to_the_same_set_and_bytes(cached_run, scheduled,
                                                                                        tmp_path):
    """Killed while logging step 9 (latest.pt at step 6; chck_1600 saved at step 8, chck_2K due at step 10): the
    resumed run saves chck_1600 again from step 8's same weights, then the rest; nothing is lost or doubled."""
    reference = word_checkpoints(scheduled)  # the uninterrupted run's
    assert sorted(reference) == sorted(map(checkpoint_name, COUNTS))
    run = with_schedule(cached_run, tmp_path)
    killed("log", "9", "-", "distill", *run.args())
    assert sorted(word_checkpoints(run)) == ["chck_1200", "chck_1600", "chck_400", "chck_800"]
    result = invoke("distill", *run.args(), "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming at step 6" in result.output
    assert word_checkpoints(run) == reference  # same directories, every file byte for byte
    assert not list((run_paths(run.cfg, run.runs).student / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize("changes, needles", [
    ({"babylm": {"track": "strict-small"}, "student_train.max_steps": None, "student_train.epochs": 10000},
     ["student_train.epochs 10000 makes the student see ", " words, over the strict-small track's 100,000,000 "
      "(babylm.track); lower student_train.epochs"]),
    ({"student_train.save_at_words": [100, 800]},
     ["student_train.save_at_words: 100 words is below one batch's 211 (the first step already sees more)"]),
    ({"student_train.save_at_words": [800, 800]}, ["student_train.save_at_words [800, 800] must be increasing"]),
    ({"student_train.save_at_words": "every-million"},
     ["student_train.save_at_words: 'every-million' is not one of ['babylm']"]),
    ({"babylm": {"track": "strict-tiny"}},
     ["babylm.track: 'strict-tiny' is not one of ['strict-small', 'strict', 'interaction', 'none']"]),
], ids=["over_budget", "below_one_batch", "not_increasing", "unknown_schedule", "unknown_track"])
def test_bad_word_settings_are_refused_before_step_one(fresh_run, changes, needles):
    user_error(invoke("distill", *edit_config(fresh_run, changes).args()), str(fresh_run.config), *needles)
    assert untrained(fresh_run)


def test_a_teacher_over_the_budget_is_refused_before_any_teacher_trains(fresh_run):
    run = edit_config(fresh_run, {"babylm": {"track": "strict-small"}, "teachers.1.train.max_steps": None,
                                  "teachers.1.train.epochs": 10_000})
    teachers = run_paths(run.cfg, run.runs).root / "teachers"
    before = files(teachers)
    user_error(invoke("teachers", *run.args()), "teachers[1].train.epochs 10000 makes teacher tg see ",
               "over the strict-small track's 100,000,000 (babylm.track); lower teachers[1].train.epochs")
    assert files(teachers) == before


def test_eval_scores_every_word_checkpoint_and_plot_draws_several_runs(scheduled, tmp_path):
    result = invoke("eval", *scheduled.args())
    assert result.exit_code == 0, result.output
    assert "words seen" in result.output  # the table's row: each trained model's words
    eval_dir = run_paths(scheduled.cfg, scheduled.runs).eval
    document = json.loads((eval_dir / "curves.json").read_text())
    points = document["curves"]["student"]
    assert [p["checkpoint"] for p in points] == [*map(checkpoint_name, COUNTS), "final"]
    words = [p["words_seen"] for p in points]
    assert words == sorted(words) and words[-1] == 2570 and all(w >= c for w, c in zip(words, COUNTS))
    assert points[-2]["dev_ce"] == points[-1]["dev_ce"]  # chck_2400 holds the final weights
    assert set(document["curves"]) == {"student"}  # the teachers saved no checkpoints by words
    assert (eval_dir / "curves.png").stat().st_size > 0
    out = tmp_path / "both.png"
    plotted = invoke("plot", str(scheduled.runs / "tiny"), str(eval_dir / "curves.json"), "--out", str(out))
    assert plotted.exit_code == 0 and "(2 runs)" in plotted.output and out.stat().st_size > 0


def test_export_submission_writes_one_folder_per_branch_and_the_upload_lines(scheduled, tmp_path):
    out = tmp_path / "submission"
    result = invoke("export", "--submission", str(out), str(scheduled.runs / "tiny"), "--repo", "me/tiny-kd")
    assert result.exit_code == 0, result.output
    branches = ["main", *map(checkpoint_name, COUNTS)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*branches, "upload.sh"])
    lines = [f"huggingface-cli upload me/tiny-kd {out / b} . --revision {b}" for b in branches]
    assert result.output.strip().splitlines()[1:] == lines
    assert (out / "upload.sh").read_text().splitlines()[-len(lines):] == lines
    student = run_paths(scheduled.cfg, scheduled.runs).student
    assert files(out / "main") == files(student / "model")
    for name in branches[1:]:
        assert files(out / name) == files(student / "checkpoints" / name)
        assert AutoModelForCausalLM.from_pretrained(out / name).config.vocab_size == 400
    refused = invoke("export", "--submission", str(out), str(scheduled.runs / "tiny"))
    user_error(refused, f"{out}: exists")


@pytest.mark.parametrize("file, at, needle", [
    ("words/train/zarr.json", b'"words": ', "zarr.json: differs from the store's manifest"),  # an attribute digit
    ("words/train/c/0", None, "words/train cannot be read"),  # chunk data: its crc32c
], ids=["attribute", "chunk"])
def test_damaged_word_counts_are_one_line_and_verify_names_the_file(fresh_run, file, at, needle):
    path = fresh_run.store / file
    data = bytearray(path.read_bytes())
    data[data.index(at) + len(at) + 1 if at else len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    user_error(invoke("distill", *fresh_run.args()), needle)
    assert untrained(fresh_run)
    result = invoke("verify", str(fresh_run.store))
    assert result.exit_code == 1 and f"{path}: differs from the store's manifest" in result.output


def test_a_resume_names_a_passed_count_that_no_directory_holds(scheduled, tmp_path):
    """A count passed before the resumed step is never saved again from other weights: the resume says so."""
    shutil.copytree(scheduled.runs, tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(scheduled.config.read_text().replace(str(scheduled.runs), str(tmp_path / "runs")))
    run = Run(tmp_path / "tiny.yaml", tmp_path / "runs")
    shutil.rmtree(run_paths(run.cfg, run.runs).student / "checkpoints" / "chck_400")
    result = invoke("distill", *run.args(), "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming at step 12, past the words of chck_400, which no directory holds" in result.output
    assert "chck_400" not in word_checkpoints(run)
