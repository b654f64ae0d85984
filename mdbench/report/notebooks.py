"""Executed notebooks as standalone HTML pages that need nothing outside the page.

nbconvert's ``lab`` template, with the scripts it would fetch from CDNs (require.js, MathJax, mermaid, the widget
manager) left out by ``templates/notebook/index.html.j2``, and the math of Markdown cells rendered here, as MathML
by latex2mathml, which browsers lay out themselves: no script, no font to fetch. Widget views (a tqdm bar's stalled
state) and JavaScript outputs fall back to their plain-text form, which is what a static page can show truly.
"""
from __future__ import annotations

import html
from pathlib import Path

import nbformat
from jinja2 import pass_context
from latex2mathml.converter import convert as latex_to_mathml
from nbconvert.exporters import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
from traitlets.config import Config

from mdbench import runner

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "notebook"  # templates/notebook/: the lab template without its CDN scripts, and a way back to the paper
INTERACTIVE = ("application/vnd.jupyter.widget-view+json", "application/javascript")


def mathml(tex: str, display: str = "inline") -> str:
    """``tex`` as a MathML element; TeX that latex2mathml cannot parse stays visible as its source."""
    try:
        return latex_to_mathml(tex, display=display)
    except Exception:  # latex2mathml's errors share no base class; the TeX source is the honest fallback
        return f'<code class="tex">{html.escape(tex)}</code>'


class MathMLRenderer(IPythonRenderer):
    """nbconvert's Markdown renderer, with math as MathML instead of TeX left for MathJax."""

    def block_math(self, body: str) -> str:
        return mathml(body, display="block")

    def inline_math(self, body: str) -> str:
        return mathml(body)

    def latex_environment(self, name: str, body: str) -> str:
        return mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display="block")


class OfflineHTMLExporter(HTMLExporter):
    """HTMLExporter whose Markdown math is MathML (:class:`MathMLRenderer`)."""

    @pass_context  # as the method it overrides: a filter that sees the cell (its attachments)
    def markdown2html(self, context, source):
        cell = context.get("cell", {})
        renderer = MathMLRenderer(escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
                                  path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                                  anchor_link_text=self.anchor_link_text,
                                  exclude_anchor_links=self.exclude_anchor_links, **self.lexer_options)
        return MarkdownWithMath(renderer=renderer).render(source)


def exporter() -> OfflineHTMLExporter:
    """The exporter: template ``templates/notebook``, widget views and JavaScript outputs shown as plain text."""
    priority = [m for m in HTMLExporter().default_config.NbConvertBase.display_data_priority if m not in INTERACTIVE]
    config = Config({"HTMLExporter": {"extra_template_basedirs": [str(TEMPLATES)], "template_name": TEMPLATE},
                     "NbConvertBase": {"display_data_priority": priority}})
    return OfflineHTMLExporter(config=config)


def render_notebook(path: Path, title: str, back: str) -> str:
    """The executed notebook at ``path`` as one HTML page titled ``title``, with a link ``back`` to its paper's
    page (relative)."""
    nb = nbformat.read(path, as_version=4)
    runner.without_widgets(nb)  # a static page shows a saved progress bar stalled at 0 %
    nb.metadata["title"] = title
    body, _ = exporter().from_notebook_node(nb, resources={"metadata": {"name": path.stem, "path": str(path.parent)},
                                                             "back": back})
    return body
