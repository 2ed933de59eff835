"""Bringing real images in: other layouts turned into the project's dataset folder.

Sources, chosen by what ``SRC`` is:

- a dataset folder (``prompts.csv`` + ``images/``): imported through its CSV;
- a folder of images whose prompt is stored inside the file, in PNG text chunks:
  DiffusionDB's ``prompt``/``seed`` keys, or AUTOMATIC1111's ``parameters`` text (the
  prompt is what comes before "Negative prompt:" / "Steps:");
- DiffusionDB part archives (``part-NNNNNN.zip``: PNGs plus ``part-NNNNNN.json`` with
  prompt, seed, steps, cfg and sampler per image), one file or a folder of them;
- a CSV file whose columns are named differently (``id_col``, ``prompt_col``, and
  ``path_col`` or images named by id in ``images_dir``).

Nothing is lost: ``OUT`` is the project's own folder (``ownership``): new, empty, or made
by an earlier import, whose files alone ``force`` removes; SRC and OUT may not contain one
another; the source is listed and read before OUT changes. Images are streamed into
``OUT/images/`` with a size limit, checked from their header (pixel limit) and decoded once;
links that leave the source and files that are not regular files are refused. Bad items stop
the import (``on_error="fail"``) or are listed in ``OUT/rejects.csv`` (``"skip"``);
``prompts.csv`` is written last, so an interrupted import never looks like a finished dataset.
"""

import contextlib
import functools
import json
import os
import re
import zipfile
from pathlib import Path

import pandas as pd

from img2prompt.config import check_setting
from img2prompt.data.archives import (
    MAX_IMAGE_BYTES,
    MAX_TABLE_BYTES,
    READ_ERRORS,
    copy_capped,
    read_member,
    read_member_bytes,
)
from img2prompt.data.dataset import (
    IMAGES_DIR,
    MAX_PROMPT_CHARS,
    PROMPTS_FILE,
    REJECTS_FILE,
    WINDOWS_DEVICE_NAMES,
    Problem,
    inside,
    prompt_problem,
    read_csv_table,
    unsafe_id_problem,
    unusable_file_problem,
    write_rejects,
)
from img2prompt.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    open_image,
    pixel_limit_problem,
)
from img2prompt.data.png_text import NotPng, read_png_text
from img2prompt.errors import DataError, shown
from img2prompt.storage.files import atomic_path, write_csv
from img2prompt.storage.ownership import claim

A1111_SETTINGS = {"Steps": "step", "Sampler": "sampler", "CFG scale": "cfg", "Seed": "seed",
                  "Size": "size", "Model": "model"}
DIFFUSIONDB_FIELDS = {"se": "seed", "st": "step", "c": "cfg", "sa": "sampler"}
DATASET_KIND = "dataset"  # the folder's kind, and its stage once prompts.csv is written
MAX_ID_LENGTH = 120


class DatasetWriter:
    """Writes a new dataset folder: ``with DatasetWriter(out) as writer``, ``add`` each
    image, then ``finish`` writes prompts.csv. Entering claims and locks ``out`` and removes
    what an earlier import wrote there (a finished one only with ``force``), except the
    recorded files under the ``keep`` prefixes."""

    def __init__(self, out, on_error="fail", force=False, keep=(), max_pixels=DEFAULT_MAX_PIXELS):
        check_setting("on_error", on_error)
        self.out, self.on_error, self.force, self.keep = Path(out), on_error, force, keep
        self.max_pixels = max_pixels
        self.rows, self.rejects, self.images, self.used_ids = [], [], {}, set()
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self.folder = claim(self.out, DATASET_KIND)
        with self._stack as stack:
            stack.enter_context(self.folder.lock(f"dataset folder {self.out}"))
            if self.folder.is_finished(DATASET_KIND) and not self.force:
                raise DataError(f"{self.out}: already holds a dataset. Choose another --out, or pass "
                                "--force to import into it anew (only the files an import wrote "
                                "there are removed).")
            self.folder.clear(keep=self.keep)
            (self.out / IMAGES_DIR).mkdir(exist_ok=True)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def new_id(self, name) -> str:
        """A safe, unique, portable imgId from a file name: other characters become '_';
        unique whatever the letter case, never a Windows device name."""
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name)).stem).lstrip(".")[:MAX_ID_LENGTH]
        stem = stem or "image"
        if stem.split(".")[0].upper() in WINDOWS_DEVICE_NAMES:
            stem += "_"
        img_id, n = stem, 2
        while img_id.casefold() in self.used_ids:
            img_id, n = f"{stem}_{n}", n + 1
        self.used_ids.add(img_id.casefold())
        return img_id

    def reject(self, item, problem, fix=""):
        if self.on_error == "fail":
            raise DataError(" ".join(filter(None, (f"{item}: {problem}", fix, "(Or pass --on-error "
                                                   "skip to leave it out and list it in rejects.csv.)"))))
        self.rejects.append(Problem(str(item), problem, fix))

    def add(self, item, name, write_image, prompt, extra=None, size=None):
        """One image with its prompt: ``write_image(file)`` writes its bytes (raising
        DataError for a bad source), ``size`` is the size the source announces."""
        if not isinstance(prompt, str):
            return self.reject(item, "no prompt text.", "Give the image its prompt.")
        problem = prompt_problem(prompt)
        if problem:
            return self.reject(item, f"{problem}.", "Give the image its prompt.")
        suffix = Path(str(name)).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            return self.reject(item, f"{shown(suffix)} is not an image extension.",
                               f"Use one of {', '.join(IMAGE_EXTENSIONS)}.")
        if size is not None and size > MAX_IMAGE_BYTES:
            return self.reject(item, f"{size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,} for an "
                               "image file.", "Shrink the image.")
        img_id = self.new_id(name)
        target = self.out / IMAGES_DIR / f"{img_id}{suffix}"
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as out:
                write_image(out)
            open_image(target, self.max_pixels)  # pixel limit from the header, then one full decode
        except DataError as error:
            if target.exists():
                self.folder.remove(target)
            self.used_ids.discard(img_id.casefold())
            return self.reject(item, f"unreadable or refused image ({str(error).split(': ', 1)[-1]})",
                               "Replace the file with a valid image.")
        self.images[img_id] = target
        renamed = {f"source_{k}" if k in ("imgId", "prompt") else k: v for k, v in (extra or {}).items()}
        self.rows.append({"imgId": img_id, "prompt": " ".join(prompt.split()), **renamed})

    def drop(self, img_ids):
        """Leave these imported images out after all (their files are removed)."""
        img_ids = set(img_ids)
        for img_id in img_ids:
            self.folder.remove(self.images.pop(img_id))
        self.rows = [row for row in self.rows if row["imgId"] not in img_ids]

    def finish(self) -> dict:
        if self.rejects:
            write_rejects(self.out / REJECTS_FILE, self.rejects)
        if not self.rows:
            raise DataError(f"{self.out}: nothing imported ({len(self.rejects)} item(s) skipped, "
                            f"see {self.out / REJECTS_FILE}).")
        write_csv(self.out / PROMPTS_FILE, pd.DataFrame(self.rows))
        self.folder.mark_finished(DATASET_KIND)
        return {"out": str(self.out), "kept": len(self.rows), "skipped": len(self.rejects),
                "rejects": str(self.out / REJECTS_FILE) if self.rejects else None}


def copy_file(path):
    """``write_image`` for a file on disk: streamed, within the size limit."""
    def write(out):
        with open(path, "rb") as source:
            copy_capped(source, out, MAX_IMAGE_BYTES, str(path))
    return write


# --- prompts stored inside PNG files -------------------------------------------------------

def a1111_fields(parameters: str) -> dict:
    """AUTOMATIC1111's ``parameters`` text: the prompt (before "Negative prompt:" or the
    "Steps:" line), the negative prompt, and the settings line's seed, steps, sampler, cfg."""
    text = parameters.replace("\r\n", "\n").strip()
    negative_at = text.find("Negative prompt:")
    settings_at = text.rfind("\nSteps:") if "\nSteps:" in text else (0 if text.startswith("Steps:") else -1)
    ends = [i for i in (negative_at, settings_at) if i >= 0]
    fields = {"prompt": text[:min(ends)].strip() if ends else text}
    if negative_at >= 0:
        stop = settings_at if settings_at > negative_at else len(text)
        fields["negative_prompt"] = text[negative_at + len("Negative prompt:"):stop].strip()
    if settings_at >= 0:
        for key, value in re.findall(r"([A-Za-z][A-Za-z ]*): ([^,]+)", text[settings_at:]):
            if key.strip() in A1111_SETTINGS:
                fields[A1111_SETTINGS[key.strip()]] = value.strip()
    return fields


def embedded_prompt(path, max_pixels=DEFAULT_MAX_PIXELS) -> dict:
    """The prompt fields stored in a PNG's text chunks ({} for other files or none), read
    without decoding the image; DataError when the image is over the pixel limit or its
    prompt over the prompt limit."""
    try:
        png = read_png_text(path, MAX_PROMPT_CHARS * 2)  # 'parameters' holds more than the prompt
    except NotPng:
        return {}
    problem = pixel_limit_problem(png.width, png.height, max_pixels)
    if problem:
        raise DataError(problem)
    for key in ("prompt", "parameters"):
        if key in png.too_long:
            raise DataError(f"its '{key}' text chunk of {png.too_long[key]:,} bytes is over the "
                            f"prompt limit of {MAX_PROMPT_CHARS:,} characters.")
    if png.text.get("prompt", "").strip():
        return {"prompt": png.text["prompt"], **({"seed": png.text["seed"]} if "seed" in png.text else {})}
    if png.text.get("parameters", "").strip():
        return a1111_fields(png.text["parameters"])
    return {}


def image_folder_files(src) -> list:
    """(path, problem or None) of every image-named entry under ``src``; linked folders are
    not entered, links leading out of ``src`` and non-regular files get their problem."""
    found = []
    for folder, dirs, files in os.walk(src):  # does not follow links to folders
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append((path, unusable_file_problem(path, (src,))))
    if not found:
        raise DataError(f"{src}: no image files found ({', '.join(IMAGE_EXTENSIONS)}).")
    return found


def import_image_folder(files, writer: DatasetWriter):
    """Images whose prompt is inside the file (PNG text chunks)."""
    for path, problem in files:
        size = path.stat().st_size if not problem else 0
        if problem or size > MAX_IMAGE_BYTES:
            writer.reject(path, problem or f"{size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,} "
                          "for an image file.")
            continue
        try:
            fields = embedded_prompt(path, writer.max_pixels)
        except DataError as error:
            writer.reject(path, f"refused ({error})", "Leave it out or shrink it.")
            continue
        except (ValueError, OSError) as error:
            writer.reject(path, f"unreadable image ({type(error).__name__}: {error}).",
                          "Replace the file with a valid image.")
            continue
        if not fields.get("prompt"):
            writer.reject(path, "no prompt in the file (looked for the PNG text chunks 'prompt' "
                          "and 'parameters').", "Import it with a CSV that holds its prompt.")
            continue
        prompt = fields.pop("prompt")
        writer.add(path, path.name, copy_file(path), prompt, {**fields, "source": path.name}, size)


# --- DiffusionDB part archives --------------------------------------------------------------

def diffusiondb_archives(src) -> list:
    src = Path(src)
    return [src] if src.is_file() else sorted(src.glob("part-*.zip"))


def read_part_table(bundle, members: dict) -> dict:
    """The part's JSON table (image name -> fields), checked; DataError otherwise."""
    tables = sorted(name for name in members if name.endswith(".json"))
    if not tables:
        raise DataError("no part-NNNNNN.json table of prompts inside.")
    data = read_member_bytes(bundle, members[tables[0]], MAX_TABLE_BYTES)
    try:
        table = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"its table {shown(tables[0])} is not UTF-8 text ({error}).") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise DataError(f"its table {shown(tables[0])} is not valid JSON ({error}).") from None
    if not isinstance(table, dict):
        raise DataError(f"its table {shown(tables[0])} holds a {type(table).__name__}, where DiffusionDB "
                        "has an object of image name -> fields.")
    return table


def import_diffusiondb_archives(archives, writer: DatasetWriter):
    """PNGs and their prompt/seed/steps/cfg/sampler from DiffusionDB part archives."""
    fix = "Download the archive again."
    for archive in archives:
        try:
            bundle = zipfile.ZipFile(archive)
        except READ_ERRORS as error:
            writer.reject(archive, f"not a readable DiffusionDB part archive ({error}).", fix)
            continue
        with bundle:
            members = {info.filename: info for info in bundle.infolist()}  # one pass: O(1) lookups
            try:
                table = read_part_table(bundle, members)
            except DataError as error:
                writer.reject(archive, f"not a readable DiffusionDB part archive: {error}", fix)
                continue
            for name, fields in table.items():
                item = f"{archive}:{shown(name)}"
                if not isinstance(fields, dict):
                    writer.reject(item, "its table entry is not an object of fields.", fix)
                elif Path(name).name != name or ".." in name or "\0" in name:  # zip slip: never leave OUT
                    writer.reject(item, "member name has a path in it; refused.")
                elif name not in members:
                    writer.reject(item, "listed in the JSON table but not in the archive.")
                else:
                    info = members[name]
                    extra = {column: fields.get(key) for key, column in DIFFUSIONDB_FIELDS.items()}
                    writer.add(item, name, lambda out, info=info, bundle=bundle: read_member(bundle, info, MAX_IMAGE_BYTES, out),
                               fields.get("p"), {**extra, "part": Path(archive).stem}, size=info.file_size)


# --- a CSV with other column names ----------------------------------------------------------

def csv_rows(csv_path, id_col="imgId", prompt_col="prompt", path_col=None) -> pd.DataFrame:
    """The CSV's rows, with the needed columns checked; DataError naming the file otherwise."""
    frame = read_csv_table(csv_path)
    wanted = [c for c in (id_col if not path_col else None, prompt_col, path_col) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: no column(s) {', '.join(missing)}; found "
                        f"{', '.join(frame.columns)}. Name them with --id-col, --prompt-col, --path-col.")
    return frame


def import_csv(csv_path, frame, writer: DatasetWriter, images_dir=None, id_col="imgId",
               prompt_col="prompt", path_col=None):
    """Rows of ``frame`` (read from ``csv_path``): the image is ``path_col`` (relative to the
    CSV's folder, never outside it) or the file named by ``id_col`` in ``images_dir``."""
    csv_dir = Path(csv_path).parent
    images_dir = Path(images_dir) if images_dir else csv_dir / IMAGES_DIR
    for number, row in enumerate(frame.to_dict("records"), start=1):
        item = f"{csv_path} row {number}"
        path, problem = _row_image(row, csv_dir, images_dir, id_col, path_col)
        if problem:
            writer.reject(item, problem, "Fix the row, or add the image beside the CSV.")
            continue
        extra = {k: v for k, v in row.items() if k not in (id_col, prompt_col, path_col)}
        writer.add(item, path.name if path_col else f"{row[id_col]}{path.suffix}", copy_file(path),
                   row[prompt_col], extra, size=path.stat().st_size)


def _row_image(row, csv_dir, images_dir, id_col, path_col):
    """(image path, None) for a CSV row, or (None, what is wrong)."""
    if path_col:
        relative = row[path_col]
        if "\0" in relative:
            return None, f"path {shown(relative)} contains a NUL character; refused."
        path = csv_dir / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute() or not inside(path, csv_dir):
            return None, f"path {shown(relative)} leaves the CSV's folder; refused."
        if not os.path.lexists(path):
            return None, f"image {shown(path)} not found."
        return path, unusable_file_problem(path, (csv_dir,))
    img_id = row[id_col]
    problem = unsafe_id_problem(img_id)
    if problem:
        return None, f"id {shown(img_id)} {problem}; refused."
    path = next((p for p in (images_dir / f"{img_id}{ext}" for ext in IMAGE_EXTENSIONS)
                 if os.path.lexists(p)), None)
    if path is None:
        return None, f"no image for id {shown(img_id)} in {images_dir}."
    return path, unusable_file_problem(path, (images_dir, csv_dir))


# --- choosing the source ----------------------------------------------------------------------

def refuse_overlap(src, out, src_is_folder):
    """SRC and OUT must not contain one another: an import reading its own output would
    duplicate it (``a_2``), and one writing into its source could replace the originals."""
    if inside(src, out) or (src_is_folder and inside(out, src)):
        raise DataError(f"{out}: the output folder and the source {src} contain one another. "
                        "Choose an --out outside the source (and not around it).")


def import_dataset(src, out, on_error="fail", force=False, max_pixels=DEFAULT_MAX_PIXELS,
                   **csv_options) -> dict:
    """Import ``src`` (see the module's docstring) into the dataset folder ``out``."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: not found.")
    if src.is_dir() and (src / PROMPTS_FILE).is_file():  # a dataset folder: its own CSV
        src = src / PROMPTS_FILE
    if src.suffix.lower() == ".csv":
        refuse_overlap(src.parent, out, src_is_folder=False)  # OUT may sit beside the CSV
        refuse_overlap(csv_options.get("images_dir") or src.parent / IMAGES_DIR, out, src_is_folder=True)
        frame = csv_rows(src, **{k: v for k, v in csv_options.items() if k != "images_dir"})
        add_all = functools.partial(import_csv, src, frame, **csv_options)
    elif src.suffix.lower() == ".zip" or (src.is_dir() and any(src.glob("part-*.zip"))):
        refuse_overlap(src, out, src_is_folder=src.is_dir())
        add_all = functools.partial(import_diffusiondb_archives, diffusiondb_archives(src))
    else:
        refuse_overlap(src, out, src_is_folder=True)
        add_all = functools.partial(import_image_folder, image_folder_files(src))
    with DatasetWriter(out, on_error, force, max_pixels=max_pixels) as writer:  # the source is read: now OUT may change
        add_all(writer)
        return writer.finish()
