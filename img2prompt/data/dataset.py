"""Datasets on disk: ``images/<imgId>.<ext>`` + ``prompts.csv`` (``imgId,prompt``).

Loading checks the folder and refuses bad data with messages that name the file or CSV
line and say how to fix it; it reads each image's header only, so that an image is decoded
once per run, when it is embedded (``readable_rows`` leaves out those that fail then, with
``--on-error skip``). ``validate_dataset`` decodes every image. Splits are
grouped by prompt text so that one prompt never lands in two splits.
"""

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from img2prompt.config import check_setting
from img2prompt.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    open_image,
    pixel_limit_problem,
)
from img2prompt.errors import DataError, printable, shown
from img2prompt.storage.files import write_csv

if TYPE_CHECKING:  # pandas loads where it is used: prediction needs none
    import pandas

PROMPTS_FILE = "prompts.csv"
IMAGES_DIR = "images"
REQUIRED_COLUMNS = ("imgId", "prompt")
SPLITS = ("train", "val", "test")
SPLIT_DTYPE = "<U5"  # 20 bytes a row (a Python str per row costs 54 more)
MAX_LISTED_PROBLEMS = 10
REJECTS_FILE = "rejects.csv"
# No text-to-image prompt comes near this (the text encoders read a few hundred characters);
# a longer one is a broken row. Import and load share the limit, so an imported dataset loads.
MAX_PROMPT_CHARS = 10_000
# Names that Windows reserves for devices, with any extension: such a file cannot exist there.
WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                        *(f"LPT{i}" for i in range(1, 10))}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where it is, what is wrong, how to fix it."""

    where: str
    what: str
    fix: str
    severity: str = "error"  # "error" refuses the dataset, "warning" is only reported

    def __str__(self):
        return printable(f"{self.severity}: {self.where}: {self.what} {self.fix}".rstrip())


class ImagePaths(Sequence):
    """The paths of image files in one folder, made when read: the folder holds the names
    only (a name costs about 60 bytes; a ``Path`` with its parts about 500). A slice is a list."""

    def __init__(self, folder: Path, names: list):
        self.folder, self.names = folder, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.folder / name for name in self.names[index]]
        return self.folder / self.names[index]


def take(texts: list, rows) -> list:
    """The texts at ``rows`` (indices, in that order)."""
    return [texts[row] for row in np.asarray(rows, dtype=np.int64).tolist()]


@dataclass
class ImageDataset:
    """A loaded, checked dataset: parallel lists of ids, prompts and image file names (in
    ``root/images``; ``paths`` gives them as paths)."""

    root: Path
    ids: list
    prompts: list
    files: list
    rejects: list = field(default_factory=list)  # Problems of the rows skipped (on_error="skip")
    max_pixels: int = DEFAULT_MAX_PIXELS  # the limit its images were checked against
    warnings: list = field(default_factory=list)  # Problems only reported (e.g. an image no row names)

    def __post_init__(self):
        self.ids, self.prompts, self.files = list(self.ids), list(self.prompts), list(self.files)

    def __len__(self):
        return len(self.ids)

    @property
    def paths(self) -> ImagePaths:
        return ImagePaths(self.root / IMAGES_DIR, self.files)

    def subset(self, mask) -> "ImageDataset":
        return self.take(np.flatnonzero(mask))

    def take(self, rows, unreadable=None) -> "ImageDataset":
        """The rows ``rows`` (indices, in that order); ``unreadable`` ({row: error message})
        are the rows left out because their image did not decode: they join ``rejects``."""
        # the message (``open_image``'s) names the file first and ends with the fix
        paths = self.paths
        dropped = [Problem(str(paths[i]), message.removeprefix(f"{paths[i]}: "), "")
                   for i, message in sorted((unreadable or {}).items())]
        return ImageDataset(self.root, take(self.ids, rows), take(self.prompts, rows), take(self.files, rows),
                            self.rejects + dropped, self.max_pixels, self.warnings)

    def readable_rows(self, unreadable: dict) -> np.ndarray:
        """Indices of the rows whose image is not in ``unreadable`` ({row: error message});
        DataError when none is left."""
        kept = np.ones(len(self), dtype=bool)
        kept[list(unreadable)] = False
        if not kept.any():
            raise DataError(f"{self.root / PROMPTS_FILE}: no usable rows (no image could be decoded; "
                            f"the first: {next(iter(unreadable.values()))}).")
        return np.flatnonzero(kept)

    def images_fingerprint(self) -> str:
        """Hash of the ids and the bytes of every image: the image-embedding cache key."""
        digest = hashlib.sha256()
        # paths as strings: a Path interns its parts, and the interpreter's table of interned
        # strings, grown by 100,000 file names, stays that size (7 MB)
        folder = str(self.paths.folder)
        for img_id, name in zip(self.ids, self.files):
            with open(os.path.join(folder, name), "rb") as handle:
                file_hash = hashlib.file_digest(handle, "sha256").hexdigest()
            digest.update(f"{img_id}\0{file_hash}\n".encode())
        return digest.hexdigest()


def find_problems(root, decode_images=False, max_pixels=DEFAULT_MAX_PIXELS) -> tuple:
    """Check a dataset folder; return (rows, problems).

    ``rows`` is (imgIds, prompts, image file names): parallel lists of the rows
    without problems. With ``decode_images`` every
    image is fully decoded, otherwise only its header is read. Paths are joined as text: a
    ``Path`` interns its parts, which would keep an interned copy of every name.
    """
    root = Path(root)
    problems = []
    csv_path = root / PROMPTS_FILE
    images_dir = root / IMAGES_DIR
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found. Pass a folder that holds "
                        f"{IMAGES_DIR}/ and {PROMPTS_FILE}.")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found. A dataset folder needs {PROMPTS_FILE} "
                        "with columns imgId,prompt.")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found. Put the images in "
                        f"{IMAGES_DIR}/<imgId>.png|jpg|jpeg|webp.")

    image_files, bad_files = _list_images(root, images_dir)
    ids, prompts, files, first_line_of, first_of_folded = [], [], [], {}, {}
    for line, img_id, prompt in _read_prompts_csv(csv_path):
        where = f"{csv_path} line {line}"
        if not img_id:
            problems.append(Problem(where, "empty imgId.", "Give every row an imgId."))
            continue
        if img_id in first_line_of:
            problems.append(Problem(where, f"duplicate imgId {shown(img_id)} (first on line "
                                    f"{first_line_of[img_id]}).", "Keep one row per image."))
            continue
        first_line_of[img_id] = line
        id_problem = unsafe_id_problem(img_id)
        if id_problem:
            problems.append(Problem(where, f"imgId {shown(img_id)} {id_problem}; refused: images "
                                    f"are only read from {images_dir}.",
                                    "Use a plain file name (no '/', '\\', '..' or NUL) as imgId."))
            continue
        problems += _portability_warnings(where, img_id, line, first_line_of, first_of_folded)
        problem = prompt_problem(prompt)
        if problem:
            problems.append(Problem(where, f"{problem} for imgId {shown(img_id)}.",
                                    "Write the prompt (shorter) or remove the row."))
            continue
        candidates = _file_names(image_files.pop(img_id, []))  # let go as the rows are read
        if not candidates and img_id in bad_files:
            problems.append(bad_files.pop(img_id))
            continue
        if not candidates:
            problems.append(Problem(where, f"no image for imgId {shown(img_id)} in {images_dir}.",
                                    f"Add {IMAGES_DIR}/{img_id}.png (or .jpg/.jpeg/.webp) "
                                    "or remove the row."))
            continue
        if len(candidates) > 1:
            names = ", ".join(shown(name) for name in candidates)
            problems.append(Problem(where, f"several images for imgId {shown(img_id)}: {names}.",
                                    "Keep exactly one."))
            continue
        problem = _check_image(os.path.join(images_dir, candidates[0]), decode_images, max_pixels)
        if problem:
            problems.append(problem)
            continue
        ids.append(img_id)
        prompts.append(prompt.strip())
        files.append(candidates[0])

    for stem, names in image_files.items():  # the images no row asked for
        if stem not in first_line_of:
            for name in _file_names(names):
                problems.append(Problem(os.path.join(images_dir, name), "image has no row in prompts.csv; it is "
                                        "ignored.", "Add a row for it to use it.", "warning"))
    for problem in bad_files.values():  # unusable files that no row asks for
        problems.append(dataclasses.replace(problem, severity="warning"))
    return (ids, prompts, files), problems


def _list_images(root, images_dir):
    """({stem: file name, or a list of them} of the usable image files, {stem: Problem} of the
    unusable ones)."""
    roots = (root, images_dir)
    image_files, bad_files = {}, {}
    with os.scandir(images_dir) as entries:  # the names only: an entry object costs 150 bytes more
        names = sorted(entry.name for entry in entries)
    for name in names:
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        path = os.path.join(images_dir, name)
        problem = unusable_file_problem(path, roots)
        if problem:
            bad_files[stem] = Problem(path, problem, "Put the image file itself in images/.")
        else:  # a name, or a list of names for an id with several files (a list costs 64 bytes)
            image_files[stem] = name if stem not in image_files else [*_file_names(image_files[stem]), name]
    return image_files, bad_files


def _file_names(found) -> list:
    """The file names ``_list_images`` found for one id (one name, or a list of them)."""
    return [found] if isinstance(found, str) else found


def unusable_file_problem(path, roots):
    """Why ``path`` must not be read as an image, else None: a link whose target lies outside
    every folder of ``roots`` (it is not the dataset's to read), or not a regular file (a
    FIFO would block the reader forever; a device never ends)."""
    if os.path.islink(path):
        target = os.path.realpath(path)
        if not any(inside(target, folder) for folder in roots):
            return f"is a link to {shown(target)}, outside {shown(roots[0])}; refused."
    if not os.path.isfile(path):
        return "is not a regular file (a folder, FIFO, device, socket or broken link); skipped."
    return None


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _portability_warnings(where, img_id, line, first_line_of, first_of_folded) -> list:
    """Ids that break the dataset on other systems: case-insensitive file systems (macOS,
    Windows) see 'A' and 'a' as one file; Windows cannot create a file named CON or NUL.
    The first id of each case-folded form is ``first_line_of``'s when it is its own folded
    form (most ids: ``first_of_folded`` stays small), else ``first_of_folded``'s."""
    warnings = []
    folded = img_id.casefold()
    first = first_of_folded.get(folded)
    if first is None and folded != img_id and folded in first_line_of:
        first = (folded, first_line_of[folded])
    if first:
        other, other_line = first
        warnings.append(Problem(where, f"imgId {shown(img_id)} differs from {shown(other)} (line "
                                f"{other_line}) only in letter case: on a case-insensitive file "
                                "system (macOS, Windows) their images are one file.",
                                "Rename one of them.", "warning"))
    elif folded != img_id:
        first_of_folded[folded] = (img_id, line)
    if img_id.split(".")[0].upper() in WINDOWS_DEVICE_NAMES:
        warnings.append(Problem(where, f"imgId {shown(img_id)} is a device name on Windows: the "
                                "dataset cannot be copied there.", "Rename the image.", "warning"))
    return warnings


def prompt_problem(prompt: str):
    """What is wrong with a prompt under the shared policy, else None."""
    if not prompt.strip():
        return "empty prompt"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"over-long prompt ({len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,})"
    return None


def unsafe_id_problem(img_id: str):
    """Why an imgId could name something outside images/ (or nothing), else None."""
    if "\0" in img_id:
        return "contains a NUL character"
    if any(bad in img_id for bad in ("/", "\\")):
        return "contains a path separator"
    if ".." in img_id:
        return "contains '..'"
    if img_id.strip() != img_id:
        return "starts or ends with spaces"
    return None


def _read_prompts_csv(csv_path):
    """Yield (line, imgId, prompt) from prompts.csv, refusing a file without the columns.
    Fields of any length are read (Python's csv stops at 128 KB and would fail the whole
    file): an over-long prompt is one row's problem (``prompt_problem``)."""
    previous_limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; found "
                    f"{', '.join(columns) or 'no header'}. The first line must be "
                    "'imgId,prompt' (other columns may follow)."
                )
            reader.fieldnames = columns
            for record in reader:
                yield reader.line_num, (record["imgId"] or "").strip(), record["prompt"] or ""
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_path}: not UTF-8 text ({error}). Save the file as UTF-8.") from None
    except csv.Error as error:
        raise DataError(f"{csv_path}: malformed CSV ({error}).") from None
    finally:
        csv.field_size_limit(previous_limit)


def read_csv_table(path) -> "pandas.DataFrame":
    """A CSV file as text columns; DataError naming the file when it cannot be read."""
    import pandas as pd
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}). Save the file as UTF-8.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error, ValueError) as error:
        raise DataError(f"{path}: malformed CSV ({error}).") from None


def _check_image(path, decode, max_pixels):
    fix = "Replace it with a valid PNG/JPEG/WebP image or remove its row."
    if decode:
        try:
            open_image(path, max_pixels)
        except DataError as error:
            return Problem(str(path), f"unreadable image ({error.__cause__ or error}).", fix)
        return None
    try:
        with Image.open(path) as image:  # the header only; decoding happens while embedding
            problem = pixel_limit_problem(image.width, image.height, max_pixels)
        if problem:
            return Problem(str(path), problem, "")
    except Exception as error:  # PIL raises many types for bad files
        return Problem(str(path), f"not a readable image ({type(error).__name__}: {error}).", fix)
    return None


def load_dataset(root, on_error="fail", max_pixels=DEFAULT_MAX_PIXELS) -> ImageDataset:
    """Load a dataset folder.

    ``on_error="fail"``: raise DataError listing what is wrong and how to fix it.
    ``on_error="skip"``: keep the good rows and record every skipped one in
    ``dataset.rejects``. Either way an image is checked by its header here (format, size);
    one whose pixels do not decode is found when it is embedded, which stops (fail) or
    leaves it out (skip): each image is decoded once.
    """
    check_setting("on_error", on_error)
    root = Path(root)
    rows, problems = find_problems(root, False, max_pixels)
    errors = [p for p in problems if p.severity == "error"]
    if errors and on_error == "fail":
        listed = "\n  ".join(str(p) for p in errors[:MAX_LISTED_PROBLEMS])
        more = len(errors) - MAX_LISTED_PROBLEMS
        tail = f"\n  … and {more} more." if more > 0 else ""
        raise DataError(f"{root}: {len(errors)} problem(s) in the dataset:\n  {listed}{tail}\n"
                        f"Run 'img2prompt data validate {root}' for the full list, or pass "
                        "--on-error skip to leave those rows out (listed in rejects.csv).")
    if not rows[0]:
        raise DataError(f"{root / PROMPTS_FILE}: no usable rows ({len(errors)} rejected). Add "
                        "imgId,prompt rows for the images.")
    warnings = [p for p in problems if p.severity != "error"]
    return ImageDataset(root, *rows, errors, max_pixels, warnings)


def write_rejects(path, rejects):
    """``rejects.csv``: one line per skipped item with the reason and the fix."""
    import pandas as pd
    write_csv(path, pd.DataFrame([{"item": p.where, "problem": p.what, "fix": p.fix} for p in rejects],
                                 columns=["item", "problem", "fix"]))


def record_rejects(dataset: ImageDataset, path, log):
    """List the rows a dataset skipped (if any) in ``path`` and say so."""
    if dataset.rejects:
        write_rejects(path, dataset.rejects)
        log(f"dataset {dataset.root}: kept {len(dataset)} images, skipped {len(dataset.rejects)} "
            f"(each with its reason in {path})")


def validate_dataset(root, max_pixels=DEFAULT_MAX_PIXELS, decode=True) -> list:
    """Every problem of a dataset folder, images fully decoded (``decode=False``: their
    headers only, as loading checks them)."""
    try:
        _, problems = find_problems(root, decode, max_pixels)
    except DataError as error:
        return [Problem(str(root), str(error), "", "error")]
    return problems


def unique_prompts(prompts):
    """(distinct prompts in first-seen order, index of each one's first occurrence)."""
    first = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)
    return list(first), list(first.values())


def normalize_prompt(prompt: str) -> str:
    """The form under which two prompts count as the same text (case, spacing)."""
    return " ".join(prompt.split()).casefold()


def grouped_split(prompts, seed=0, val_fraction=0.15, test_fraction=0.15) -> np.ndarray:
    """Assign each image to train/val/test so that identical prompts share a split.

    Groups (distinct prompts) are shuffled with ``seed`` and dealt to test, then val, until
    each holds its fraction of the images; the rest is train.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"split fractions val={val_fraction}, test={test_fraction} must be in "
                        "[0, 1) and sum to less than 1.")
    keys = [normalize_prompt(p) for p in prompts]
    groups = sorted(set(keys))
    members = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    order = np.random.default_rng(seed).permutation(len(groups))
    n = len(prompts)
    targets = {"test": _target_size(n, test_fraction), "val": _target_size(n, val_fraction)}
    splits = np.full(n, "train", dtype=SPLIT_DTYPE)
    filled = {"test": 0, "val": 0}
    for group_index in order:
        indices = members[groups[group_index]]
        for name in ("test", "val"):
            if filled[name] < targets[name]:
                splits[indices] = name
                filled[name] += len(indices)
                break
    return splits


def _target_size(n, fraction):
    return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else 0


def save_splits(path, dataset: ImageDataset, splits):
    import pandas as pd
    write_csv(path, pd.DataFrame({"imgId": dataset.ids, "split": splits}))


def load_splits(path, dataset: ImageDataset) -> np.ndarray:
    """Read a split file (imgId,split) and check it covers exactly the dataset's images.
    Read by the csv module: a DataFrame's text keeps its memory pool's blocks
    (20 MB at 100,000 rows)."""
    wrong = f"{path}: expected columns imgId,split with split in {SPLITS}"
    ids, codes = [], []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            if next(reader, None) != ["imgId", "split"]:
                raise DataError(f"{wrong}; the first line is not 'imgId,split'.")
            for row in reader:
                if len(row) != 2 or row[1] not in SPLITS:
                    raise DataError(f"{wrong}; line {reader.line_num} is {shown(','.join(row))}.")
                ids.append(row[0])
                codes.append(SPLITS.index(row[1]))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{wrong} ({error}).") from None
    splits = np.array(SPLITS, dtype=SPLIT_DTYPE)[np.array(codes, dtype=np.int64)]
    if ids == dataset.ids:  # as written: in the dataset's order
        return splits
    by_id = dict(zip(ids, splits))
    if set(by_id) != set(dataset.ids):
        missing = len(set(dataset.ids) - set(by_id))
        extra = len(set(by_id) - set(dataset.ids))
        raise DataError(f"{path}: the split does not match the dataset in {dataset.root} "
                        f"({missing} image(s) not in the split, {extra} no longer in the "
                        "dataset). Use a new run folder, or --force to start this one anew.")
    return np.array([by_id[i] for i in dataset.ids], dtype=SPLIT_DTYPE)


# the least images a split needs: a mapper learns from 10, early stopping and the decoder's
# epoch choice need 2 to compare, and a test score of fewer than 2 images says nothing
MINIMUM_SPLIT = {"train": 10, "val": 2, "test": 2}


def check_split_sizes(dataset, splits, config):
    """DataError naming the minimum when a split of ``dataset`` is too small to study."""
    sizes = split_counts(splits)
    if any(sizes[name] < least for name, least in MINIMUM_SPLIT.items()):
        needed = ", ".join(f"{least} {name}" for name, least in MINIMUM_SPLIT.items())
        got = ", ".join(f"{sizes[name]} {name}" for name in SPLITS)
        raise DataError(f"{dataset.root}: too few images to study: {len(dataset)} give {got} (grouped by prompt, "
                        f"val_fraction {config.val_fraction}, test_fraction {config.test_fraction}); a run needs at "
                        f"least {needed}. Add image–prompt pairs (about {sum(MINIMUM_SPLIT.values()) * 2} or more), "
                        "or change --val-fraction and --test-fraction.")


def split_counts(splits) -> dict:
    return {name: int((splits == name).sum()) for name in SPLITS}


def split_summary(dataset, splits) -> str:
    return f"dataset {dataset.root}: {len(dataset)} images; split {split_counts(splits)} (grouped by prompt)"
