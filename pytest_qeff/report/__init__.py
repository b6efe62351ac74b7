"""The HTML report: a view of one ``results.json``, rendered with Jinja2 into a folder.

    DIR/index.html          one row per card
    DIR/cards/<id>.html     the card's settings, every stage against its tolerances, token diffs,
                            benchmark figures with an SVG chart against the baseline, environment
    DIR/style.css

No JavaScript; every string is escaped (autoescape is on for every template, whatever its name).
Re-render any results file with ``python -m pytest_qeff.report render RESULTS --out DIR``.
"""

from __future__ import annotations

from pathlib import Path

from pytest_qeff.report.views import card_view, index_view

__all__ = ["render", "templates_dir"]


def templates_dir() -> Path:
    """``pytest_qeff/templates`` in the wheel (a link to the top-level ``templates/`` in a checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "index.html.j2").is_file():
            return candidate
    raise FileNotFoundError(f"the report templates are missing (looked in {here / 'templates'}); reinstall qeff")


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,  # not select_autoescape: our templates end in .j2
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(results: dict, out_dir: str | Path) -> Path:
    """Write the report of ``results`` into ``out_dir``; return the path of ``index.html``."""
    from qeff.store.atomic import write_bytes, write_text

    out = Path(out_dir)
    (out / "cards").mkdir(parents=True, exist_ok=True)
    env = _environment()
    index = index_view(results)
    page = env.get_template("card.html.j2")
    # Every page is written atomically; the index last, so it never links a page not yet written.
    for row in index.rows:
        view = card_view(results, row.id)
        write_text(out / "cards" / f"{row.id}.html", page.render(view=view, root="../"))
    write_bytes(out / "style.css", (templates_dir() / "style.css").read_bytes())
    write_text(out / "index.html", env.get_template("index.html.j2").render(view=index, root=""))
    return out / "index.html"
