"""Bringing real images in: other layouts turned into the project's dataset folder.

Sources, chosen by what ``SRC`` is:

- a folder of images whose prompt is stored inside the file, in PNG text chunks:
  DiffusionDB's ``prompt``/``seed`` keys, or AUTOMATIC1111's ``parameters`` text (the
  prompt is what comes before "Negative prompt:" / "Steps:");
- DiffusionDB part archives (``part-NNNNNN.zip``: PNGs plus ``part-NNNNNN.json`` with
  prompt, seed, steps, cfg and sampler per image), one file or a folder of them;
- a CSV file whose columns are named differently (``id_col``, ``prompt_col``, and
  ``path_col`` or images named by id in ``images_dir``).

Every image is copied into ``OUT/images/`` and decoded once to check it; ``prompts.csv`` is
written last, so an interrupted import never looks like a finished dataset. Bad items stop
the import (``on_error="fail"``) or are listed in ``OUT/rejects.csv`` (``"skip"``).
"""

import csv
import json
import re
import shutil
import zipfile
from pathlib import Path

import pandas as pd
from PIL import Image

from .data import IMAGES_DIR, ON_ERROR, PROMPTS_FILE, REJECTS_FILE, Problem, write_rejects
from .errors import DataError
from .files import atomic_path, write_csv
from .images import IMAGE_EXTENSIONS, open_image

A1111_SETTINGS = {"Steps": "step", "Sampler": "sampler", "CFG scale": "cfg", "Seed": "seed",
                  "Size": "size", "Model": "model"}
DIFFUSIONDB_FIELDS = {"se": "seed", "st": "step", "c": "cfg", "sa": "sampler"}


class DatasetWriter:
    """Collects the rows of a new dataset folder; ``finish`` writes prompts.csv."""

    def __init__(self, out, on_error="fail", force=False):
        if on_error not in ON_ERROR:
            raise DataError(f"--on-error must be fail or skip (got '{on_error}').")
        self.out, self.on_error = Path(out), on_error
        if (self.out / PROMPTS_FILE).exists() and not force:
            raise DataError(f"{self.out}: already holds a dataset. Choose another --out, or pass "
                            "--force to import into it anew.")
        if force and (self.out / IMAGES_DIR).is_dir():
            shutil.rmtree(self.out / IMAGES_DIR)
        (self.out / PROMPTS_FILE).unlink(missing_ok=True)
        (self.out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.rows, self.rejects, self.used_ids = [], [], set()

    def new_id(self, name) -> str:
        """A safe, unique imgId from a file name: other characters become '_'."""
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name)).stem).lstrip(".") or "image"
        img_id, n = stem, 2
        while img_id in self.used_ids:
            img_id, n = f"{stem}_{n}", n + 1
        self.used_ids.add(img_id)
        return img_id

    def reject(self, item, problem, fix):
        if self.on_error == "fail":
            raise DataError(f"{item}: {problem} {fix} (Or pass --on-error skip to leave it out "
                            "and list it in rejects.csv.)")
        self.rejects.append(Problem(str(item), problem, fix))

    def add(self, item, name, content: bytes, prompt, extra=None):
        """Write one image (``content``, named after ``name``) with its prompt."""
        prompt = " ".join(str(prompt or "").split())
        if not prompt:
            return self.reject(item, "no prompt.", "Give the image a non-empty prompt.")
        suffix = Path(str(name)).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            return self.reject(item, f"'{suffix}' is not an image extension.",
                               f"Use one of {', '.join(IMAGE_EXTENSIONS)}.")
        img_id = self.new_id(name)
        target = self.out / IMAGES_DIR / f"{img_id}{suffix}"
        with atomic_path(target) as tmp:
            tmp.write_bytes(content)
        try:
            open_image(target)
        except DataError as error:
            target.unlink()
            self.used_ids.discard(img_id)
            return self.reject(item, f"unreadable image ({str(error).split(': ', 1)[-1]})",
                               "Replace the file with a valid image.")
        self.rows.append({"imgId": img_id, "prompt": prompt, **(extra or {})})

    def finish(self) -> dict:
        if self.rejects:
            write_rejects(self.out / REJECTS_FILE, self.rejects)
        else:
            (self.out / REJECTS_FILE).unlink(missing_ok=True)
        if not self.rows:
            raise DataError(f"{self.out}: nothing imported ({len(self.rejects)} item(s) skipped, "
                            f"see {self.out / REJECTS_FILE}).")
        write_csv(self.out / PROMPTS_FILE, pd.DataFrame(self.rows))
        return {"out": str(self.out), "kept": len(self.rows), "skipped": len(self.rejects),
                "rejects": str(self.out / REJECTS_FILE) if self.rejects else None}


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


def embedded_prompt(path) -> dict:
    """The prompt fields stored in an image file's text chunks ({} when there are none)."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if text.get("prompt", "").strip():
        return {"prompt": text["prompt"], **({"seed": text["seed"]} if "seed" in text else {})}
    if text.get("parameters", "").strip():
        return a1111_fields(text["parameters"])
    return {}


def import_image_folder(src, writer: DatasetWriter):
    """Images whose prompt is inside the file (PNG text chunks)."""
    files = sorted(p for p in Path(src).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{src}: no image files found ({', '.join(IMAGE_EXTENSIONS)}).")
    for path in files:
        try:
            fields = embedded_prompt(path)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            writer.reject(path, f"unreadable image ({type(error).__name__}: {error}).",
                          "Replace the file with a valid image.")
            continue
        if not fields.get("prompt"):
            writer.reject(path, "no prompt in the file (looked for the PNG text chunks 'prompt' "
                          "and 'parameters').", "Import it with a CSV that holds its prompt.")
            continue
        prompt = fields.pop("prompt")
        writer.add(path, path.name, path.read_bytes(), prompt, {**fields, "source": path.name})


# --- DiffusionDB part archives --------------------------------------------------------------

def diffusiondb_archives(src) -> list:
    src = Path(src)
    return [src] if src.is_file() else sorted(src.glob("part-*.zip"))


def import_diffusiondb_archives(archives, writer: DatasetWriter):
    """PNGs and their prompt/seed/steps/cfg/sampler from DiffusionDB part archives."""
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as bundle:
                broken = bundle.testzip()
                if broken:
                    raise zipfile.BadZipFile(f"member {broken} fails its CRC check")
                tables = [n for n in bundle.namelist() if n.endswith(".json")]
                if not tables:
                    raise zipfile.BadZipFile("no part-NNNNNN.json table of prompts inside")
                table = json.loads(bundle.read(tables[0]))
                for name, fields in table.items():
                    item = f"{archive}:{name}"
                    if Path(name).name != name or ".." in name:  # zip slip: never leave OUT
                        writer.reject(item, "member name has a path in it; refused.", "")
                        continue
                    if name not in bundle.namelist():
                        writer.reject(item, "listed in the JSON table but not in the archive.", "")
                        continue
                    extra = {column: fields.get(key) for key, column in DIFFUSIONDB_FIELDS.items()}
                    writer.add(item, name, bundle.read(name), fields.get("p"),
                               {**extra, "part": Path(archive).stem})
        except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as error:
            writer.reject(archive, f"not a readable DiffusionDB part archive ({error}).",
                          "Download the archive again.")


# --- a CSV with other column names ----------------------------------------------------------

def import_csv(csv_path, writer: DatasetWriter, images_dir=None, id_col="imgId",
               prompt_col="prompt", path_col=None):
    """Rows of ``csv_path``: the image is ``path_col`` (relative to the CSV's folder) or the
    file named by ``id_col`` (any image extension) in ``images_dir``."""
    csv_path = Path(csv_path)
    images_dir = Path(images_dir) if images_dir else csv_path.parent / IMAGES_DIR
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_path}: not UTF-8 text ({error}). Save the file as UTF-8.") from None
    except (pd.errors.ParserError, csv.Error) as error:
        raise DataError(f"{csv_path}: malformed CSV ({error}).") from None
    wanted = [c for c in (id_col if not path_col else None, prompt_col, path_col) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: no column(s) {', '.join(missing)}; found "
                        f"{', '.join(frame.columns)}. Name them with --id-col, --prompt-col, --path-col.")
    for line, row in zip(range(2, len(frame) + 2), frame.to_dict("records")):
        item = f"{csv_path} row {line - 1}"
        if path_col:
            relative = row[path_col]
            path = (csv_path.parent / relative).resolve()
            if ".." in Path(relative).parts or not path.is_relative_to(csv_path.parent.resolve()):
                writer.reject(item, f"path '{relative}' leaves the CSV's folder; refused.",
                              "Keep the images beside the CSV.")
                continue
        else:
            matches = [images_dir / f"{row[id_col]}{ext}" for ext in IMAGE_EXTENSIONS]
            path = next((p for p in matches if p.is_file()), None)
            if "/" in row[id_col] or ".." in row[id_col] or path is None:
                writer.reject(item, f"no image for id '{row[id_col]}' in {images_dir}.",
                              "Add the image or pass --path-col.")
                continue
        if not path.is_file():
            writer.reject(item, f"image {path} not found.", "Add the image or remove the row.")
            continue
        extra = {k: v for k, v in row.items() if k not in (id_col, prompt_col, path_col)}
        writer.add(item, path.name if path_col else f"{row[id_col]}{path.suffix}", path.read_bytes(),
                   row[prompt_col], extra)


def import_dataset(src, out, on_error="fail", force=False, **csv_options) -> dict:
    """Import ``src`` (see the module's docstring) into the dataset folder ``out``."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: not found.")
    if Path(out).resolve() == src.resolve():
        raise DataError(f"{out}: the output folder must differ from the source.")
    writer = DatasetWriter(out, on_error, force)
    if src.suffix.lower() == ".csv":
        import_csv(src, writer, **csv_options)
    elif src.suffix.lower() == ".zip" or (src.is_dir() and any(src.glob("part-*.zip"))):
        import_diffusiondb_archives(diffusiondb_archives(src), writer)
    else:
        import_image_folder(src, writer)
    return writer.finish()
