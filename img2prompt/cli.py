"""The command line: ``img2prompt data|embed|train|train-decoder|evaluate|predict|generate|report`` (also ``python -m img2prompt``).

Errors of the Img2PromptError family, and operating-system errors such as an unwritable
folder, print as one message (what, where, how to fix) and exit with status 2; progress and
logs go to stderr, results to stdout.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from img2prompt.config import FIELDS, StudyConfig, check_setting
from img2prompt.errors import Img2PromptError, printable

DATA_OPTIONS = ("on_error", "max_pixels")
ENCODER_OPTIONS = ("image_encoder", "image_weights", "text_encoder", "text_model", "text_pooling",
                   "cache_dir", "embed_batch_size", "num_workers", "engine", "ray_address", "decoder_grid",
                   "decoder_map", "decoder_colors")
TRAINING_OPTIONS = ("seed", "val_fraction", "test_fraction", "hidden_size", "depth", "dropout",
                    "learning_rate", "weight_decay", "batch_size", "max_epochs", "patience",
                    "bank", "search", "bootstrap", "tune", "tune_blocks", "tune_learning_rate", "layer_decay",
                    "ema_decay", "tune_batch_size", "accumulate_steps", "tune_epochs", "tune_patience")
DECODER_OPTIONS = ("decoder", "decoder_tune", "decoder_grid", "decoder_map", "decoder_colors", "prefix_length",
                   "decoder_width", "decoder_layers",
                   "decoder_heads", "decoder_dropout", "decoder_prefix_dropout", "decoder_early_learning", "decoder_learning_rate",
                   "decoder_batch_size", "decoder_epochs", "decoder_patience", "decoder_val_images")
DECODING_OPTIONS = ("decode_strategy", "beam_width", "top_p", "temperature", "max_length",
                    "no_repeat_ngram")
CONFIG_FIELDS = FIELDS


def log(message):
    print(printable(message), file=sys.stderr, flush=True)


def add_config_options(parser, names):
    """``--name`` options for StudyConfig fields; unset ones keep the dataclass default."""
    for name in names:
        spec = CONFIG_FIELDS[name]
        kind = type(spec.default) if spec.default is not None else str
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=f"{spec.metadata['help']} (default: {spec.default})".replace("%", "%%"))


def chosen_options(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def config_from_args(args, names, **values) -> StudyConfig:
    """The settings given on the command line, checked before anything runs."""
    return StudyConfig(**chosen_options(args, names), **values).validate()


def cmd_validate(args):
    from img2prompt.data.dataset import validate_dataset
    problems = validate_dataset(args.dir, args.max_pixels)
    for problem in problems:
        print(problem)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    print(f"{args.dir}: {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def cmd_import(args):
    from img2prompt.data.importers import import_dataset
    csv_options = {k: v for k, v in (("id_col", args.id_col), ("prompt_col", args.prompt_col),
                                     ("path_col", args.path_col), ("images_dir", args.images)) if v}
    summary = import_dataset(args.src, args.out, args.on_error, args.force, args.max_pixels, **csv_options)
    skipped = (f", skipped {summary['skipped']} (each with its reason in {summary['rejects']})"
               if summary["skipped"] else "")
    print(f"{summary['out']}: kept {summary['kept']} images{skipped}")
    return 0


def cmd_download(args):
    from img2prompt.data.download import DIFFUSIONDB_URL, download_diffusiondb
    summary = download_diffusiondb(args.out, args.parts, args.base_url or DIFFUSIONDB_URL, args.drop_nsfw,
                                   args.on_error, args.force, progress=not args.quiet, log=log)
    extra = [f"skipped {summary['skipped']} (reasons in {summary['rejects']})"] if summary["skipped"] else []
    if args.drop_nsfw is not None:
        extra.append(f"dropped {summary['dropped_nsfw']} flagged NSFW (score >= {args.drop_nsfw})")
    print(f"{summary['out']}: kept {summary['kept']} images" + "".join(f", {e}" for e in extra))
    return 0


def cmd_synth(args):
    from img2prompt.data.synth import SynthParams, generate_dataset
    out = generate_dataset(args.out, SynthParams(args.n, args.size, args.seed), force=args.force)
    print(f"{out}: {args.n} generated images with prompts.csv and attributes.csv")
    return 0


def cmd_embed(args):
    from img2prompt.data.dataset import load_dataset, record_rejects
    from img2prompt.encoders.embeddings import EmbeddingCache, dataset_embeddings
    config = config_from_args(args, DATA_OPTIONS + ENCODER_OPTIONS + ("device",), data_dir=args.data)
    dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
    log(f"dataset {dataset.root}: {len(dataset)} images")
    found = dataset_embeddings(config, dataset, progress=not args.quiet, log=log, resume=args.resume)
    if found.dataset.rejects:  # the rows refused on loading and the images that did not decode
        record_rejects(found.dataset, args.rejects or EmbeddingCache(config.cache_dir).rejects_path(config.data_dir),
                       log)
    print(f"image embeddings: {found.image_emb.shape}, prompt embeddings: {found.target_emb.shape} "
          f"(cache: {config.cache_dir})")
    return 0


def cmd_train(args):
    from img2prompt import distributed
    from img2prompt.run import Run

    def start_run():
        if args.resume:
            return Run.open(args.out, args.device)
        config = config_from_args(args, DATA_OPTIONS + ENCODER_OPTIONS + TRAINING_OPTIONS + ("device",),
                                  data_dir=args.data, run_dir=args.out)
        return Run.create(config, force=args.force, log=log)

    with distributed.process_group(process_timeout(args), args.device or "auto") as main:  # under torchrun: every process
        run = distributed.main_first(start_run) or Run.open(args.out, args.device)  # the main one makes the run
        summary = run.train(resume=args.resume, progress=not args.quiet, log=log)
    if not main:
        return 0  # the main process reports
    print(json.dumps(summary) if args.json else
          f"trained {summary['run_dir']}: validation cosine {summary['val_cosine']:.4f} "
          f"(epoch {summary['best_epoch']} of {summary['epochs']})")
    return 0


def process_timeout(args) -> int:
    return check_setting("process_timeout", args.process_timeout or FIELDS["process_timeout"].default)


def cmd_evaluate(args):

    from img2prompt.run import Run
    run = Run.open(args.run, args.device)
    metrics = run.evaluate(bank=args.bank, search=args.search, data_dir=args.data, progress=not args.quiet, log=log)
    print(json.dumps(metrics.data, indent=2) if args.json else metrics.text())
    log(f"wrote the per-image results and the metrics into {run.root}")
    return 0


def cmd_train_decoder(args):
    from img2prompt import distributed
    from img2prompt.run import Run

    with distributed.process_group(process_timeout(args), args.device or "auto") as main:  # under torchrun: every process
        run = Run.open(args.run, args.device)
        run.update(**chosen_options(args, DECODER_OPTIONS + DECODING_OPTIONS))  # saved by the main process
        summary = run.train_decoder(force=args.force, resume=args.resume, progress=not args.quiet, log=log)
    if not main:
        return 0  # the main process reports
    print(json.dumps(summary) if args.json else
          f"trained the {summary['decoder']} decoder of {args.run}: validation loss "
          f"{summary['val_loss']:.4f} (epoch {summary['best_epoch']} of {summary['epochs']}, "
          f"{summary['train_samples_per_s']:.0f} samples/s)")
    return 0


def cmd_predict(args):
    from img2prompt.evaluation.familiarity import guess_warning
    from img2prompt.predict import (
        Predictor,
        image_files,
        write_captions,
        write_predictions,
    )
    from img2prompt.run import Run
    run = Run.open(args.run, args.device)
    decoding = dataclasses.replace(run.config, **chosen_options(args, DECODING_OPTIONS))
    predictor = Predictor(run, method=args.method, decode_options=decoding.decode_options())
    results = predictor.predict(image_files(args.images, args.recursive), top_k=args.top_k, progress=not args.quiet)
    if args.out:
        write_predictions(args.out, results)
        log(f"wrote {len(results)} prediction(s) into {args.out}")
    if args.captions:
        written, kept = write_captions(results, args.overwrite_captions)
        log(f"wrote {len(written)} caption(s) beside the images" + (
            f"; kept {len(kept)} existing one(s) (--overwrite-captions replaces them)" if kept else ""))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(printable(f"{result['image']}\t{result['prompt']}\t({describe(result)})"))
    unfamiliar = [result["image"] for result in results if result["unfamiliar"]]
    if unfamiliar:
        log(f"warning: {guess_warning(unfamiliar, len(results))}")
    return 0


def describe(result) -> str:
    """A prediction's method, its own measure and the image's familiarity, in words."""
    measure = (f"token probability {result['token_probability']:.3f}" if "token_probability" in result
               else f"similarity to the stored prompt {result['similarity']:.3f}")
    familiarity = "unknown" if result["familiarity"] is None else f"{result['familiarity']:.0f}"
    return f"{result['method']}; {measure}; familiarity {familiarity}" + (
        ": UNFAMILIAR, a guess" if result["unfamiliar"] else "")


def cmd_report(args):
    from img2prompt.reports.notebooks import run_notebooks
    given = dict(args.parameters or [])
    outcome = run_notebooks(args.notebooks, args.reports, given, cwd=Path.cwd(), log=log)
    if outcome["metrics"]:
        print(outcome["metrics"].text())
    print(f"reports: {outcome['index']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="img2prompt", description=(
        "Recover the text prompt behind an image: image encoder -> MLP mapper -> prompt "
        "embedding, scored by all-MiniLM-L6-v2 cosine."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="validate, import or generate datasets").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    validate = data.add_parser("validate", help="report every problem of a dataset folder")
    validate.add_argument("dir", help="dataset folder (images/ + prompts.csv)")
    validate.add_argument("--max-pixels", type=int, default=CONFIG_FIELDS["max_pixels"].default,
                          help="largest width x height of an image (default: %(default)s)")
    validate.set_defaults(handler=cmd_validate)
    imports = data.add_parser(
        "import", help="turn images with prompts from another layout into a dataset folder",
        description="SRC: a folder of images with the prompt in their PNG text chunks "
                    "(DiffusionDB 'prompt', AUTOMATIC1111 'parameters'); DiffusionDB part "
                    "archives (a part-NNNNNN.zip or a folder of them); or a CSV file.")
    imports.add_argument("src", help="image folder, DiffusionDB archive(s) or CSV file")
    imports.add_argument("--out", required=True, help="dataset folder to write")
    imports.add_argument("--id-col", help="CSV: column of image ids (default: imgId)")
    imports.add_argument("--prompt-col", help="CSV: column of prompts (default: prompt)")
    imports.add_argument("--path-col", help="CSV: column of image paths, relative to the CSV")
    imports.add_argument("--images", help="CSV: folder of images named by id (default: images/ "
                         "beside the CSV)")
    imports.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                         help="bad items: stop (default) or leave out, listed in OUT/rejects.csv")
    imports.add_argument("--max-pixels", type=int, default=CONFIG_FIELDS["max_pixels"].default,
                         help="largest width x height of an image, checked before decoding "
                         "(default: %(default)s)")
    imports.add_argument("--force", action="store_true", help="import anew into a dataset folder "
                         "that an earlier import made (only what it wrote is removed)")
    imports.set_defaults(handler=cmd_import)
    download = data.add_parser("download", help="download DiffusionDB parts into a dataset folder")
    download.add_argument("source", choices=("diffusiondb",), help="what to download")
    download.add_argument("--out", required=True, help="dataset folder to write")
    download.add_argument("--parts", default="1", help="part numbers, e.g. 1-5 or 1,3 (default: 1)")
    download.add_argument("--base-url", default=None, help="a mirror of DiffusionDB's files "
                          "(default: its Hugging Face hosting)")
    download.add_argument("--drop-nsfw", type=float, nargs="?", const=0.5, default=None,
                          metavar="SCORE", help="drop images whose image or prompt NSFW score in "
                          "the metadata is at least SCORE (default when given: 0.5)")
    download.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                          help="bad items in the archives: stop, or leave out (rejects.csv)")
    download.add_argument("--force", action="store_true", help="write into an existing dataset folder")
    download.add_argument("--quiet", action="store_true", help="no progress bars")
    download.set_defaults(handler=cmd_download)
    synth = data.add_parser("synth", help="generate the synthetic default dataset")
    synth.add_argument("--out", required=True, help="folder to write the dataset to")
    for option, name in (("--n", "n_images"), ("--size", "image_size"), ("--seed", "seed")):
        synth.add_argument(option, type=int, default=CONFIG_FIELDS[name].default,
                           help=f"{CONFIG_FIELDS[name].metadata['help']} (default: %(default)s)")
    synth.add_argument("--force", action="store_true", help="replace a dataset made differently")
    synth.set_defaults(handler=cmd_synth)

    def command(name, help_text, handler):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        add_config_options(sub, ("device",))
        sub.set_defaults(handler=handler)
        return sub

    embed = command("embed", "extract (and cache) image and prompt embeddings of a dataset", cmd_embed)
    embed.add_argument("--data", required=True, help="dataset folder")
    embed.add_argument("--rejects", help="with --on-error skip: where the skipped rows are listed "
                       "(default: a CSV named after the dataset in the cache folder's rejects/)")
    embed.add_argument("--resume", action="store_true",
                       help="continue an interrupted extraction instead of starting over")
    add_config_options(embed, DATA_OPTIONS + ENCODER_OPTIONS)

    train = command("train", "train the mapper on a dataset into a run folder", cmd_train)
    train.add_argument("--data", required=True, help="dataset folder")
    train.add_argument("--out", required=True, help="run folder to create")
    train.add_argument("--force", action="store_true", help="retrain a run folder that holds a model")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run of this "
                       "--out with its saved settings (embedding extraction and training)")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_options(train, DATA_OPTIONS + ENCODER_OPTIONS + TRAINING_OPTIONS + ("process_timeout",))


    evaluate = command("evaluate", "score all methods on the run's test split", cmd_evaluate)
    evaluate.add_argument("--run", required=True, help="run folder made by train")
    evaluate.add_argument("--data", help="dataset folder, when it moved since training")
    evaluate.add_argument("--bank", choices=("train", "all"),
                          help="prompt bank for retrieval (default: the run's, train)")
    evaluate.add_argument("--search", choices=("auto", "exact", "approximate"),
                          help="nearest-neighbour search for retrieval and kNN (default: the run's, auto: "
                          "exact up to 20,000 bank rows)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    train_decoder = command("train-decoder", "train the prompt decoder of a run (its data, split "
                            "and cached embeddings)", cmd_train_decoder)
    train_decoder.add_argument("--run", required=True, help="run folder made by train (or notebook 01)")
    train_decoder.add_argument("--force", action="store_true", help="retrain an existing decoder")
    train_decoder.add_argument("--resume", action="store_true", help="continue an interrupted decoder training")
    train_decoder.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_options(train_decoder, DECODER_OPTIONS + DECODING_OPTIONS + ("process_timeout",))

    predict = command("predict", "the prompt of your images, with a trained run (its best method: the decoder "
                      "once it has one)", cmd_predict)
    predict.add_argument("--method", choices=("decoder", "retrieval"), default=None,
                         help="decoder (the written prompt) or retrieval (the nearest stored prompt); default: "
                         "the run's best")
    generate = command("generate", "write prompts for any images with the run's decoder "
                       "(predict --method decoder)", cmd_predict)
    generate.set_defaults(method="decoder")
    for sub in (predict, generate):
        sub.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
        sub.add_argument("--run", default="runs/default", help="run folder (default: runs/default, which "
                         "./run_all.sh makes)")
        sub.add_argument("--recursive", action="store_true", help="folders: their subfolders' images too")
        sub.add_argument("--top-k", type=int, default=5, help="stored prompts nearest to each image, in --json "
                         "and --out (default: 5)")
        sub.add_argument("--out", metavar="FILE.csv", help="also write the predictions as CSV: image, prompt, "
                         "method, familiarity, unfamiliar, top_k")
        sub.add_argument("--captions", action="store_true", help="also write each prompt beside its image as "
                         "IMAGE.txt (the caption file training tools read); an existing one is kept")
        sub.add_argument("--overwrite-captions", action="store_true", help="with --captions: replace existing ones")
        sub.add_argument("--json", action="store_true", help="print JSON")
        add_config_options(sub, DECODING_OPTIONS)

    report = commands.add_parser(
        "report", help="run the numbered notebooks with papermill and write HTML reports",
        description="Run notebooks/NN_*.ipynb in order with papermill (stopping at the first "
                    "failure), export each to HTML and write reports/index.html.")
    report.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append",
                        metavar=("NAME", "VALUE"), help="a notebook parameter (repeatable)")
    report.add_argument("--notebooks", default="notebooks", help="notebook folder (default: notebooks)")
    report.add_argument("--reports", default="reports", help="output folder (default: reports)")
    report.set_defaults(handler=cmd_report)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on hub retries; set 0 to allow
    args = build_parser().parse_args(argv)
    before = _stop_on_sigterm()
    try:
        return args.handler(args)
    except Img2PromptError as error:
        log(f"error: {error}")
        return 2
    except OSError as error:  # unwritable folder, full disk, …: the message names the path
        log(f"error: {error}")
        return 2
    except KeyboardInterrupt as stop:
        terminated = stop.args == (TERMINATED,)
        log(f"{'terminated' if terminated else 'interrupted'} (train and embed continue with --resume)")
        return 143 if terminated else 130
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


TERMINATED = "SIGTERM"


def _stop_on_sigterm():
    """SIGTERM (a scheduler's or torchrun's stop) ends a command as Ctrl-C does, through its
    cleanup: temporary files removed, locks released, the state kept for --resume. Returns
    the handler it replaced (None off the main thread, where Python allows none)."""
    def stop(signum, frame):
        raise KeyboardInterrupt(TERMINATED)

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, stop)
