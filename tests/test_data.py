import shutil

import numpy as np
import pytest
from PIL import Image

from img2prompt.data.dataset import (
    grouped_split,
    load_dataset,
    load_splits,
    normalize_prompt,
    save_splits,
    validate_dataset,
)
from img2prompt.errors import DataError


def make_dataset(root, rows, images=None):
    """Write prompts.csv with ``rows`` (raw CSV text lines) and small PNGs named in ``images``."""
    (root / "images").mkdir(parents=True)
    (root / "prompts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name in images or []:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / name)
    return root


def test_loads_ids_prompts_and_paths(tmp_path):
    root = make_dataset(tmp_path, ["imgId,prompt", "a,a red circle", "b,\"two stars, blue\""],
                        ["a.png", "b.png"])
    dataset = load_dataset(root)
    assert dataset.ids == ["a", "b"]
    assert dataset.prompts == ["a red circle", "two stars, blue"]
    assert [p.name for p in dataset.paths] == ["a.png", "b.png"]


@pytest.mark.parametrize("rows, files, message", [
    (["imgId,caption", "a,x"], ["a.png"], "missing column.*prompt"),
    (["imgId,prompt", "a,x", "a,y"], ["a.png"], "line 3: duplicate imgId 'a'"),
    (["imgId,prompt", "a,   "], ["a.png"], "line 2: empty prompt"),
    (["imgId,prompt", "a,x", "b,y"], ["a.png"], "line 3: no image for imgId 'b'"),
    (["imgId,prompt", "a,x"], ["a.png", "a.jpg"], "several images for imgId 'a'"),
])
def test_bad_data_is_refused_with_file_and_line(tmp_path, rows, files, message):
    root = make_dataset(tmp_path, rows, files)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_unreadable_image_is_refused(tmp_path):
    root = make_dataset(tmp_path, ["imgId,prompt", "a,x", "b,y"], ["a.png"])
    (root / "images" / "b.png").write_text("not an image")
    with pytest.raises(DataError, match="b.png: not a readable image"):
        load_dataset(root)


def test_non_utf8_csv(tmp_path):
    root = make_dataset(tmp_path, ["imgId,prompt"], [])
    (root / "prompts.csv").write_bytes(b"imgId,prompt\na,caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(root)


def test_missing_folder_parts(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="prompts.csv: file not found"):
        load_dataset(tmp_path / "d")


def test_validate_lists_every_problem_and_warns_on_unreferenced(tmp_path):
    root = make_dataset(tmp_path, ["\ufeffimgId,prompt", "a,x", "b,", "c,z"], ["a.png", "extra.png", "c.png"])
    buffer = (root / "images" / "c.png").read_bytes()
    (root / "images" / "c.png").write_bytes(buffer[: len(buffer) // 2])  # truncated: only full decoding sees it
    problems = validate_dataset(root)
    text = "\n".join(map(str, problems))
    assert "line 3: empty prompt" in text
    assert "c.png: unreadable image" in text
    assert "warning:" in text and "extra.png" in text
    assert [p.severity for p in problems].count("error") == 2


def test_a_loaded_dataset_keeps_its_warnings_and_the_rows_it_skipped(tmp_path):
    """What notebook 01 prints: the folder is listed once, by loading it."""
    root = make_dataset(tmp_path, ["imgId,prompt", "a,x", "b,", "c,z"], ["a.png", "extra.png", "c.png"])
    dataset = load_dataset(root, on_error="skip")
    assert dataset.ids == ["a", "c"]
    assert ["line 3: empty prompt" in str(p) for p in dataset.rejects] == [True]
    assert [p.severity for p in dataset.warnings] == ["warning"] and "extra.png" in str(dataset.warnings[0])
    assert dataset.take([1]).warnings == dataset.warnings


def test_split_is_grouped_by_prompt_and_deterministic():
    prompts = [f"prompt {i % 40}" for i in range(200)] + ["Prompt  1"]  # same text as 'prompt 1'
    first = grouped_split(prompts, seed=7)
    assert np.array_equal(first, grouped_split(prompts, seed=7))
    assert not np.array_equal(first, grouped_split(prompts, seed=8))
    by_prompt = {}
    for prompt, split in zip(prompts, first):
        by_prompt.setdefault(normalize_prompt(prompt), set()).add(split)
    assert all(len(splits) == 1 for splits in by_prompt.values())
    counts = {s: int((first == s).sum()) for s in ("train", "val", "test")}
    assert counts["test"] >= 25 and counts["val"] >= 25 and counts["train"] >= 120


def test_saved_split_must_match_the_dataset(tmp_path, small_dataset):
    dataset = load_dataset(small_dataset)
    splits = grouped_split(dataset.prompts, seed=0)
    save_splits(tmp_path / "splits.csv", dataset, splits)
    assert np.array_equal(load_splits(tmp_path / "splits.csv", dataset), splits)
    smaller = dataset.subset(np.arange(len(dataset)) > 0)
    with pytest.raises(DataError, match="does not match the dataset"):
        load_splits(tmp_path / "splits.csv", smaller)


def test_a_split_file_in_another_order_or_broken_is_read_or_refused_by_line(tmp_path, small_dataset):
    dataset = load_dataset(small_dataset)
    splits = grouped_split(dataset.prompts, seed=0)
    path = tmp_path / "splits.csv"
    save_splits(path, dataset, splits)
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *reversed(rows)]) + "\n")  # another order: read by id
    assert np.array_equal(load_splits(path, dataset), splits) and load_splits(path, dataset).dtype.kind == "U"
    path.write_text("\n".join([header, rows[0], rows[1].replace(",", ",training,"), *rows[2:]]) + "\n")
    with pytest.raises(DataError, match=r"splits.csv: expected columns imgId,split .* line 3 is"):
        load_splits(path, dataset)
    path.write_text("id,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="the first line is not 'imgId,split'"):
        load_splits(path, dataset)


def test_image_fingerprint_follows_content(tmp_path, small_dataset):
    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    before = load_dataset(copy).images_fingerprint()
    assert before == load_dataset(small_dataset).images_fingerprint()
    first = sorted((copy / "images").iterdir())[0]
    Image.new("RGB", (96, 96)).save(first)
    assert load_dataset(copy).images_fingerprint() != before


@pytest.mark.parametrize("ids, expected", [
    (["ab", "Ab"], ["line 3: imgId 'Ab' differs from 'ab' (line 2)"]),
    (["Ab", "ab"], ["line 3: imgId 'ab' differs from 'Ab' (line 2)"]),
    (["AB", "ab", "aB"], ["line 3: imgId 'ab' differs from 'AB' (line 2)",
                          "line 4: imgId 'aB' differs from 'AB' (line 2)"]),
    (["ab", "cd", "CD", "AB"], ["line 4: imgId 'CD' differs from 'cd' (line 3)",
                                "line 5: imgId 'AB' differs from 'ab' (line 2)"]),
])
def test_ids_differing_only_in_case_are_named_with_the_first_of_them(tmp_path, ids, expected):
    root = make_dataset(tmp_path, ["imgId,prompt", *(f"{i},prompt {n}" for n, i in enumerate(ids))],
                        [f"{i}.png" for i in ids])
    warnings = [str(p) for p in validate_dataset(root) if "letter case" in str(p)]
    assert len(warnings) == len(expected)
    for warning, wanted in zip(warnings, expected):
        assert wanted in warning, warning
