"""Run the numbered notebooks with papermill and turn them into HTML reports.

Each study's reports go to a folder of their own, named after its run folder
(``reports/default/`` for ``runs/default``): each executed notebook, its HTML (figures
embedded as data URIs, no script needed to read it) and ``index.html`` with the headline
metrics, the run's parameters and links to every report. ``reports/index.html`` lists the
studies; a second study never erases the first's. While a notebook runs, its stage lines
(images/s while embedding, epoch k of n with the validation cosine while training) go to
the terminal.
"""

import ast
import contextlib
import html
import os
import sys
import time
from pathlib import Path

from img2prompt.errors import RunError
from img2prompt.progress import LINES, QUIET_VARIABLE
from img2prompt.run import EVALUATE, Run
from img2prompt.storage.files import write_text
from img2prompt.storage.ownership import claim

NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"
INDEX_FILE = "index.html"


def find_notebooks(notebook_dir) -> list:
    notebooks = sorted(Path(notebook_dir).glob(NOTEBOOK_PATTERN))
    if not notebooks:
        raise RunError(f"{notebook_dir}: no numbered notebooks (NN_name.ipynb) found.")
    return notebooks


def declared_parameters(notebook) -> dict:
    """``{name: default value}`` of the notebook's cell tagged ``parameters``."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    if not declared:
        raise RunError(f"{notebook}: has no code cell tagged 'parameters'.")
    return {name: ast.literal_eval(spec["default"]) for name, spec in declared.items()}


def convert_value(name, text, default, notebook):
    """A command-line string as the type of the notebook's default for ``name``."""
    if not isinstance(text, str) or default is None or isinstance(default, str):
        return text
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        return type(default)(text)
    except ValueError:
        raise RunError(f"parameter {name}: '{text}' is not a {type(default).__name__} "
                       f"({notebook.name} declares {name} = {default!r}).") from None


def plan_parameters(notebooks, given: dict) -> list:
    """For each notebook, the given parameters it declares, converted to its types.

    A name that no notebook declares is refused, so a typo never passes unnoticed."""
    declared = {notebook: declared_parameters(notebook) for notebook in notebooks}
    known = sorted({name for names in declared.values() for name in names})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise RunError(f"unknown parameter(s) {', '.join(unknown)}. The notebooks declare: "
                       f"{', '.join(known)}.")
    return [(notebook, {name: convert_value(name, given[name], default, notebook)
                        for name, default in defaults.items() if name in given},
             defaults) for notebook, defaults in declared.items()]


# JupyterLab's look without its <script> tags (require.js, MathJax, Mermaid from a CDN):
# a report reads the same offline, and the notebooks use neither LaTeX nor diagrams.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_html(notebook_path, html_path):
    """The executed notebook as one self-contained HTML file (figures as data URIs)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2")
    body, _ = exporter.from_filename(str(notebook_path))
    write_text(html_path, body)


def _failure_message(notebook, error, executed, html_path):
    source = (error.source or "").strip().splitlines()
    first_line = source[0] if source else ""
    return (f"notebook {notebook.name} failed in cell {error.cell_index} "
            f"(execution count {error.exec_count}: {first_line!r}): {error.ename}: {error.evalue}. "
            f"The executed notebook with the error is {executed}; its report {html_path}.")


def run_notebooks(notebook_dir, reports_dir, given: dict, cwd=".", log=print) -> dict:
    """Execute the notebooks in order with ``given`` parameters, stopping at the first that
    fails; export HTML for each and write the study's index, then the list of studies.
    Returns a summary for the caller. ``reports_dir`` and the study's folder in it are the
    project's own: made by it, and cleared of only what it wrote (the study's folder only)."""
    notebooks = find_notebooks(notebook_dir)
    plan = plan_parameters(notebooks, given)
    run_dir = {**{k: v for _, _, defaults in plan for k, v in defaults.items()}, **given}.get("run_dir", "run")
    base = claim(reports_dir, "reports")  # a folder the project did not make is refused
    with base.lock(f"reports folder {reports_dir}"), _progress_lines():
        folder = claim(base.root / study_name(run_dir), "reports")
        folder.clear()  # a report from an earlier run of this study must not pass for this one's
        outcome = _run(plan, folder, cwd, log)
        write_text(base.root / INDEX_FILE, studies_html(base.root))
        return {**outcome, "studies": base.root / INDEX_FILE}


def study_name(run_dir) -> str:
    """The folder of a study's reports: its run folder's name (``runs/default`` → ``default``)."""
    return Path(str(run_dir)).name or "run"


@contextlib.contextmanager
def _progress_lines():
    """Progress as lines in the kernels papermill starts (they inherit the environment): no
    widget state in a report, and text that reaches the terminal while a notebook runs."""
    before = os.environ.get(QUIET_VARIABLE)
    os.environ[QUIET_VARIABLE] = LINES
    try:
        yield
    finally:
        if before is None:
            del os.environ[QUIET_VARIABLE]
        else:
            os.environ[QUIET_VARIABLE] = before


def _run(plan, folder, cwd, log):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    reports_dir = folder.root
    effective, reports = {}, []
    for notebook, parameters, defaults in plan:
        executed = reports_dir / notebook.name
        html_path = executed.with_suffix(".html")
        log(f"running {notebook.name} ...")
        folder.record(executed)  # papermill writes it itself
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=parameters,
                                       cwd=str(cwd), progress_bar=False, kernel_name="python3",
                                       stdout_file=_Indented(sys.stderr), stderr_file=_Indented(sys.stderr),
                                       # the kernel's start-up warnings are noise for readers
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
        except PapermillExecutionError as error:
            export_html(executed, html_path)
            raise RunError(_failure_message(notebook, error, executed, html_path)) from None
        export_html(executed, html_path)
        seconds = time.perf_counter() - started
        log(f"  {html_path} ({seconds:.1f} s)")
        effective.update({**defaults, **parameters})
        reports.append({"notebook": notebook.name, "html": html_path.name,
                        "executed": executed.name, "seconds": seconds})
    run_dir = Path(cwd) / str(effective.get("run_dir", ""))
    metrics, data_dir = None, None
    try:
        run = Run.open(run_dir)
        data_dir = run.config.data_dir
        metrics = run.metrics() if run.is_finished(EVALUATE) else None
    except RunError:
        pass  # the notebooks stopped before starting a run
    write_text(reports_dir / INDEX_FILE, index_html(reports, effective, metrics, run_dir, data_dir))
    return {"reports": reports, "parameters": effective, "metrics": metrics,
            "index": reports_dir / INDEX_FILE}


class _Indented:
    """A stream that writes a notebook's output lines indented under its name."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        self.stream.write("".join(f"    {line}" if line.strip() else line for line in text.splitlines(True)))
        self.stream.flush()

    def flush(self):
        self.stream.flush()


def studies_html(reports_dir) -> str:
    """``reports/index.html``: one line per study whose reports are in the folder."""
    studies = sorted(p.parent for p in Path(reports_dir).glob(f"*/{INDEX_FILE}"))
    items = "".join(f'<li><a href="{html.escape(p.name)}/{INDEX_FILE}">{html.escape(p.name)}</a></li>'
                    for p in studies)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>img2prompt studies</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}</style>
</head><body>
<h1>img2prompt studies</h1>
<p>Each study's reports, named after its run folder:</p>
<ul>{items}</ul>
</body></html>
"""


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def index_html(reports, parameters, metrics, run_dir, data_dir=None) -> str:
    """The landing page: headline metrics, the run's parameters, links to every report."""
    if metrics:
        headline = (f"<p>{metrics.n_test} test images; image encoder "
                    f"<code>{html.escape(metrics.image_encoder)}</code>, target "
                    f"<code>{html.escape(metrics.text_encoder)}</code>, scored by cosine in "
                    f"{html.escape(metrics.metric_encoder)} space.</p>"
                    + metrics.table().to_html(float_format=lambda v: f"{v:.4f}", na_rep=""))
    else:
        headline = f"<p>No evaluation in {html.escape(str(run_dir))}.</p>"
    links = "".join(
        f'<li><a href="{html.escape(r["html"])}">{html.escape(r["notebook"][:-6])}</a> '
        f'(<a href="{html.escape(r["executed"])}">notebook</a>, {r["seconds"]:.0f} s)</li>'
        for r in reports)
    params = _table(("parameter", "value"), sorted((k, repr(v)) for k, v in parameters.items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>img2prompt reports</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }}
th {{ background: #f3f3f3; }}
</style></head>
<body>
<h1>img2prompt study</h1>
<h2>Headline metrics</h2>
{headline}
<h2>Reports</h2>
<ol>{links}</ol>
<h2>Parameters</h2>
<p>Dataset: <code>{html.escape(str(data_dir))}</code>. Run folder:
<code>{html.escape(str(run_dir))}</code> (its <code>config.json</code> holds every setting with
package versions and the git commit).</p>
{params}
</body></html>
"""
