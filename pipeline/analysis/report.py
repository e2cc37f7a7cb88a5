"""Rendering for the offline reports: plots (PNG), a self-contained HTML page, Markdown.

Shared by the cluster report (`pipeline cluster --report DIR`) and the similarity-matrix
heatmap (`pipeline similarity-matrix --report out.html`). This module only draws and writes:
the numbers come in as plain dataclasses built by cluster.py (or a matrix from metrics.py).

HTML pages embed their images as base64 PNG and carry their CSS inline, so one file can be
mailed or opened from disk with no network; the Markdown report links PNG files beside it.

matplotlib (and scipy, for the heatmap's ordering) come with the optional `report` extra and
are imported only when a plot is drawn, so the rest of the package works without them.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import MissingExtra, pip_install
from pipeline.parquet import atomic_write_bytes

log = logging.getLogger(__name__)

SNIPPET_CHARS = 240


# ---------------------------------------------------------------------------------------------
# What a cluster report shows (built by cluster.py)


@dataclass
class Document:
    row: int  # a document's first row when documents are clustered
    doc_id: str
    text: str
    similarity: float  # to the cluster centroid, or (near-duplicates) to its closest duplicate
    chunk: int = 0


@dataclass
class ClusterSection:
    cluster: int
    size: int
    cohesion: float  # mean cosine similarity of members to the centroid; nan when empty
    top_words: list[tuple[str, float]]  # (word, c-TF-IDF score), best first
    representatives: list[Document]  # nearest the centroid, nearest first
    neighbours: list[tuple[int, float]]  # (cluster, centroid cosine), nearest first


@dataclass
class DuplicateGroup:
    size: int  # members of the group; `documents` may show only the first few
    documents: list[Document]
    min_similarity: float  # over the pairs that joined the group
    max_similarity: float


@dataclass
class ClusterReport:
    title: str
    n: int  # what was clustered: documents, or rows (windows) with `cluster --rows`
    dim: int
    clusters: list[ClusterSection]
    duplicate_threshold: float | None = None  # None: the near-duplicate search did not run
    duplicate_pairs: int = 0
    duplicate_groups: list[DuplicateGroup] = field(default_factory=list)
    duplicate_groups_total: int = 0
    k_curve: list[tuple[int, float]] | None = None  # (k, silhouette) when k was chosen
    facts: dict[str, str] = field(default_factory=dict)  # settings and timings, shown as-is
    images: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes
    unit: str = "documents"  # the word for what n counts: "documents" or "rows"


def image_caption(name: str, unit: str = "documents") -> str:
    return {"k_curve": "Choosing k: mean silhouette (cosine) of a sample, higher is better",
            "map": f"2-D map of a sample of {unit}, coloured by cluster",
            "sizes": "Cluster sizes"}[name]


# ---------------------------------------------------------------------------------------------
# Plots: each returns PNG bytes. matplotlib's object API (Figure + Agg) keeps no global state.


def require_report_extra(heatmap: bool = False) -> None:
    """Raise MissingExtra now, before hours of work, if the plots (and for the heatmap, its
    ordering) cannot be drawn."""
    _figure_class()
    if heatmap:
        _scipy_linkage()


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(
            f"reports need matplotlib: {pip_install('report')}") from None
    return Figure


def _scipy_linkage():
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage
        from scipy.spatial.distance import squareform
    except ImportError:
        raise MissingExtra(
            f"the heatmap needs scipy: {pip_install('report')}") from None
    return leaves_list, linkage, squareform


def _figure(width: float, height: float):
    return _figure_class()(figsize=(width, height), dpi=100, layout="constrained")


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def cluster_colours(k: int) -> np.ndarray:
    """(k, 4) RGBA: 60 colours from tab20/20b/20c, cycled beyond that.

    Those maps hold shades of a hue side by side (tab20: dark blue, light blue, ...); taking
    every 2nd (tab20) or 4th (20b, 20c) first puts distinct hues on neighbouring clusters.
    """
    from matplotlib import colormaps

    order = {"tab20": [*range(0, 20, 2), *range(1, 20, 2)],
             "tab20b": [i for shade in range(4) for i in range(shade, 20, 4)],
             "tab20c": [i for shade in range(4) for i in range(shade, 20, 4)]}
    palette = np.concatenate([colormaps[name](np.array(idx)) for name, idx in order.items()])
    return palette[np.arange(k) % len(palette)]


def plot_map(xy: np.ndarray, labels: np.ndarray, k: int, method: str = "PCA",
             annotate: int = 30, unit: str = "documents") -> bytes:
    """Scatter of 2-D points coloured by cluster, the largest clusters' ids at their middles."""
    fig = _figure(9, 7)
    ax = fig.add_subplot()
    colours = cluster_colours(k)
    size = float(np.clip(20_000 / max(len(xy), 1), 3, 16))  # fewer points, bigger dots
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[labels], s=size, alpha=0.7, linewidths=0)
    # Clusters are numbered by size, so ids below `annotate` are the largest ones.
    for c in range(min(k, annotate)):
        members = xy[labels == c]
        if len(members):
            x, y = np.median(members, axis=0)
            ax.annotate(str(c), (x, y), ha="center", va="center", fontsize=9, weight="bold",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7,
                              "lw": 0})
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"{len(xy):,} {unit}, {k} clusters")
    return figure_png(fig)


def plot_sizes(sizes: np.ndarray, unit: str = "documents") -> bytes:
    k = len(sizes)
    fig = _figure(min(14, 4 + 0.18 * k), 3.5)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), sizes, color=cluster_colours(k), width=0.85)
    ax.set_xlabel("cluster")
    ax.set_ylabel(unit)
    if k <= 60:
        ax.set_xticks(np.arange(k))
        ax.tick_params(axis="x", labelsize=7)
    ax.margins(x=0.01)
    return figure_png(fig)


def plot_k_curve(curve: list[tuple[int, float]], chosen: int) -> bytes:
    ks, scores = zip(*curve, strict=True)
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    ax.plot(ks, scores, marker="o")
    best = dict(curve)[chosen]
    ax.scatter([chosen], [best], s=160, facecolors="none", edgecolors="red", linewidths=2,
               zorder=3, label=f"chosen k = {chosen}")
    ax.set_xscale("log")
    ticks = _spread_ticks(ks, chosen)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("mean silhouette")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_png(fig)


def _spread_ticks(ks: Sequence[int], keep: int, min_gap: float = 0.045) -> list[int]:
    """The ks whose labels do not collide on a log axis (at least min_gap of its width
    apart), always including `keep`."""
    span = math.log(max(ks) / min(ks)) or 1.0
    ticks: list[int] = []
    for k in ks:
        if not ticks or math.log(k / ticks[-1]) / span >= min_gap:
            ticks.append(k)
    if keep not in ticks:
        ticks = [t for t in ticks if abs(math.log(t / keep)) / span >= min_gap] + [keep]
    return sorted(ticks)


def plot_heatmap(matrix: np.ndarray, labels: list[str], title: str,
                 higher_is_similar: bool = True) -> bytes:
    n = len(labels)
    side = min(16.0, 3.0 + 0.32 * n)
    fig = _figure(side + 3.5, side)
    ax = fig.add_subplot()
    cmap = "viridis" if higher_is_similar else "viridis_r"
    im = ax.imshow(matrix, cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8,
                 label="similarity" if higher_is_similar else "distance")
    # Past ~60 rows, tick labels overlap: the page's table gives the sentences by number.
    if n <= 60:
        ax.set_xticks(np.arange(n))
        ax.set_yticks(np.arange(n))
        ax.set_xticklabels([str(i + 1) for i in range(n)], fontsize=7)
        ax.set_yticklabels([f"{i + 1}. {_shorten(s, 45)}" for i, s in enumerate(labels)],
                           fontsize=7)
    if n <= 16:
        mid = (np.nanmax(matrix) + np.nanmin(matrix)) / 2
        for i in range(n):
            for j in range(n):
                light = (matrix[i, j] < mid) == higher_is_similar
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    ax.set_title(title)
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# Similarity-matrix heatmap


def hierarchical_order(matrix: np.ndarray, higher_is_similar: bool = True) -> np.ndarray:
    """Row order that puts similar rows next to each other (average-linkage dendrogram leaves).

    A similarity matrix becomes a dissimilarity as max - s (1 - cosine for cosine); the
    optimal leaf ordering flips subtrees so neighbouring leaves are as close as possible.
    """
    n = len(matrix)
    if n < 3:
        return np.arange(n)
    leaves_list, linkage, squareform = _scipy_linkage()
    m = np.asarray(matrix, np.float64)
    d = np.nanmax(m) - m if higher_is_similar else m.copy()
    d = np.nan_to_num(np.clip((d + d.T) / 2, 0, None))
    np.fill_diagonal(d, 0)
    tree = linkage(squareform(d, checks=False), method="average", optimal_ordering=True)
    return leaves_list(tree)


def looks_like_similarity(matrix: np.ndarray) -> bool:
    """Distances (euclidean, manhattan) have a zero diagonal; similarities a maximal one."""
    diag = np.diag(matrix)
    return not (np.allclose(diag, 0, atol=1e-6) and np.nanmax(matrix) > 0)


def run_similarity_report(sentences: list[str], matrix: np.ndarray, out_html: Path,
                          title: str, higher_is_similar: bool | None = None) -> Path:
    """Write a self-contained HTML heatmap of `matrix`, rows and columns ordered by clustering.

    `higher_is_similar` says whether the matrix holds similarities (cosine, dot, pearson) or
    distances (euclidean, manhattan); left out, it is read off the diagonal.
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (len(sentences), len(sentences)):
        raise ValueError(f"matrix is {matrix.shape} but there are {len(sentences)} sentences")
    if not sentences:
        raise ValueError("no sentences to draw")
    if higher_is_similar is None:
        higher_is_similar = looks_like_similarity(matrix)
    order = hierarchical_order(matrix, higher_is_similar)
    ordered = matrix[np.ix_(order, order)]
    labels = [sentences[i] for i in order]
    png = plot_heatmap(ordered, labels, title, higher_is_similar)
    rows = "\n".join(
        f"<tr><td class=num>{pos + 1}</td><td class=num>{orig + 1}</td>"
        f"<td>{_e(sentences[orig])}</td></tr>" for pos, orig in enumerate(order))
    body = f"""
<h1>{_e(title)}</h1>
<p class=muted>{len(sentences)} sentences. Rows and columns are reordered by average-linkage
hierarchical clustering, so groups of similar sentences show as blocks along the diagonal.</p>
{_img(png, "similarity heatmap")}
<h2>Sentences in heatmap order</h2>
<table><thead><tr><th class=num>#</th><th class=num>input line</th><th>sentence</th></tr></thead>
<tbody>
{rows}
</tbody></table>"""
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_page(title, body).encode("utf-8"), out_html)
    log.info("wrote %s", out_html)
    return out_html


# ---------------------------------------------------------------------------------------------
# The cluster report: HTML and Markdown from one ClusterReport


def write_cluster_report(report: ClusterReport, out_dir: Path) -> dict[str, Path]:
    """report.html (images inside), report.md and its PNGs; returns what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, png in report.images.items():
        path = out_dir / f"{name}.png"
        atomic_write_bytes(png, path)
        written[name] = path
    written["html"] = out_dir / "report.html"
    atomic_write_bytes(render_cluster_html(report).encode("utf-8"), written["html"])
    written["markdown"] = out_dir / "report.md"
    atomic_write_bytes(render_cluster_markdown(report).encode("utf-8"), written["markdown"])
    return written


def render_cluster_html(report: ClusterReport) -> str:
    k = len(report.clusters)
    parts = [f"<h1>{_e(report.title)}</h1>",
             f"<p class=muted>{report.n:,} {report.unit} &middot; {report.dim} dimensions "
             f"&middot; {k} clusters (spherical k-means)</p>",
             _facts_html(report.facts),
             "<nav>Jump to: <a href='#overview'>overview</a> &middot; "
             "<a href='#clusters'>clusters</a> &middot; <a href='#duplicates'>near-duplicates"
             "</a></nav>",
             "<h2 id=overview>Overview</h2>"]
    for name in ("k_curve", "map", "sizes"):
        if name in report.images:
            caption = image_caption(name, report.unit)
            parts.append(f"<figure>{_img(report.images[name], caption)}"
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    if report.k_curve:
        parts.append(_k_curve_html(report.k_curve, k))
    parts.append("<h2 id=clusters>Clusters</h2>")
    parts.append(_cluster_table_html(report.clusters))
    parts.extend(_cluster_html(c, report.unit) for c in report.clusters)
    parts.append("<h2 id=duplicates>Near-duplicates</h2>")
    parts.append(_duplicates_html(report))
    return _page(report.title, "\n".join(parts))


def _facts_html(facts: dict[str, str]) -> str:
    if not facts:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())
    return f"<details><summary>Settings and timings</summary><table>{rows}</table></details>"


def _k_curve_html(curve: list[tuple[int, float]], chosen: int) -> str:
    cells = "".join(f"<tr{' class=chosen' if k == chosen else ''}><td class=num>{k}</td>"
                    f"<td class=num>{s:.4f}</td></tr>" for k, s in curve)
    return ("<details><summary>Silhouette for each k tried</summary><table class=narrow>"
            "<thead><tr><th class=num>k</th><th class=num>silhouette</th></tr></thead>"
            f"<tbody>{cells}</tbody></table></details>")


def _cluster_table_html(clusters: list[ClusterSection]) -> str:
    rows = "".join(
        f"<tr><td class=num><a href='#c{c.cluster}'>{c.cluster}</a></td>"
        f"<td class=num>{c.size:,}</td><td class=num>{_num(c.cohesion)}</td>"
        f"<td>{_e(', '.join(w for w, _ in c.top_words[:6]))}</td></tr>" for c in clusters)
    return ("<table class=clusters><thead><tr><th class=num>cluster</th><th class=num>size</th>"
            "<th class=num>cohesion</th><th>distinctive words</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _cluster_html(c: ClusterSection, unit: str) -> str:
    top = max((s for _, s in c.top_words), default=1.0) or 1.0
    words = " ".join(f"<span class=word style='opacity:{0.45 + 0.55 * s / top:.2f}' "
                     f"title='c-TF-IDF {s:.4f}'>{_e(w)}</span>" for w, s in c.top_words)
    neighbours = ", ".join(f"<a href='#c{j}'>{j}</a> ({s:.2f})" for j, s in c.neighbours)
    docs = "".join(f"<li><span class=sim>{d.similarity:.3f}</span> <b>{_e(_doc_name(d))}"
                   f"</b> {_e(_shorten(d.text, SNIPPET_CHARS))}</li>"
                   for d in c.representatives)
    return f"""<section id=c{c.cluster} class=cluster>
<h3>Cluster {c.cluster}</h3>
<p class=muted>{c.size:,} {unit} &middot; cohesion {_num(c.cohesion)}
 &middot; nearest clusters: {neighbours or '&mdash;'}</p>
<p>{words or '<span class=muted>no words</span>'}</p>
<ol class=docs>{docs}</ol>
</section>"""


def _duplicates_html(report: ClusterReport) -> str:
    if report.duplicate_threshold is None:
        return "<p class=muted>Not searched.</p>"
    head = (f"<p>{report.duplicate_pairs:,} pairs with cosine similarity &ge; "
            f"{report.duplicate_threshold:g}, joined into {report.duplicate_groups_total:,} "
            f"groups{_shown(report)}.</p>")
    groups = []
    for number, g in enumerate(report.duplicate_groups, 1):
        docs = "".join(f"<li><span class=sim>{d.similarity:.3f}</span> <b>"
                       f"{_e(_doc_name(d))}</b> {_e(_shorten(d.text, 160))}</li>"
                       for d in g.documents)
        groups.append(f"<div class=group><p class=muted>group {number}: "
                      f"{_count(g, report.unit)}, "
                      f"similarity {g.min_similarity:.3f}&ndash;{g.max_similarity:.3f}"
                      f"</p><ul>{docs}</ul></div>")
    return head + "".join(groups)


def _count(g: DuplicateGroup, unit: str) -> str:
    shown = f" ({len(g.documents)} shown)" if len(g.documents) < g.size else ""
    return f"{g.size} {unit}{shown}"


def _shown(report: ClusterReport) -> str:
    shown = len(report.duplicate_groups)
    return f" (the {shown} largest shown)" if shown < report.duplicate_groups_total else ""


def render_cluster_markdown(report: ClusterReport) -> str:
    k = len(report.clusters)
    out = [f"# {_md(report.title)}", "",
           f"{report.n:,} {report.unit} · {report.dim} dimensions · {k} clusters "
           "(spherical k-means)", ""]
    if report.facts:
        out += ["| setting | value |", "|---|---|"]
        out += [f"| {_md(k_)} | {_md(v)} |" for k_, v in report.facts.items()]
        out.append("")
    out += ["## Overview", ""]
    for name in ("k_curve", "map", "sizes"):
        if name in report.images:
            out += [f"![{image_caption(name, report.unit)}]({name}.png)", ""]
    if report.k_curve:
        out += ["| k | silhouette |", "|---:|---:|"]
        out += [f"| {'**' + str(kk) + '**' if kk == k else kk} | {s:.4f} |"
                for kk, s in report.k_curve]
        out.append("")
    out += ["## Clusters", "", "| cluster | size | cohesion | distinctive words |",
            "|---:|---:|---:|---|"]
    out += [f"| [{c.cluster}](#cluster-{c.cluster}) | {c.size:,} | {_num(c.cohesion)} | "
            f"{_md(', '.join(w for w, _ in c.top_words[:6]))} |" for c in report.clusters]
    out.append("")
    for c in report.clusters:
        neighbours = ", ".join(f"{j} ({s:.2f})" for j, s in c.neighbours) or "—"
        out += [f"### Cluster {c.cluster}", "",
                f"{c.size:,} {report.unit} · cohesion {_num(c.cohesion)} · "
                f"nearest clusters: {neighbours}", "",
                "Distinctive words: " + (_md(", ".join(w for w, _ in c.top_words)) or "—"), ""]
        out += [f"{i}. `{d.similarity:.3f}` **{_md(_doc_name(d))}** "
                f"{_md(_shorten(d.text, SNIPPET_CHARS))}"
                for i, d in enumerate(c.representatives, 1)]
        out.append("")
    out += ["## Near-duplicates", ""]
    if report.duplicate_threshold is None:
        out.append("Not searched.")
    else:
        out += [f"{report.duplicate_pairs:,} pairs with cosine similarity ≥ "
                f"{report.duplicate_threshold:g}, joined into "
                f"{report.duplicate_groups_total:,} groups{_shown(report)}.", ""]
        for number, g in enumerate(report.duplicate_groups, 1):
            out += [f"**Group {number}**: {_count(g, report.unit)}, similarity "
                    f"{g.min_similarity:.3f}–"
                    f"{g.max_similarity:.3f}", ""]
            out += [f"- `{d.similarity:.3f}` **{_md(_doc_name(d))}** "
                    f"{_md(_shorten(d.text, 160))}" for d in g.documents]
            out.append("")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Small helpers


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _md(text: object) -> str:
    """Keep table cells and emphasis intact: escape the characters Markdown reads."""
    out = str(text).replace("\\", "\\\\")
    for ch in "|*_`[]<>#":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def _num(x: float) -> str:
    return "—" if x is None or np.isnan(x) else f"{x:.3f}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _doc_name(d: Document) -> str:
    return f"{d.doc_id}#{d.chunk}" if d.chunk else str(d.doc_id)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.muted { color: #666; } a { color: #0b5cad; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; } figcaption { color: #666; font-size: 90%; }
table { border-collapse: collapse; margin: .5em 0 1em; width: 100%; }
table.narrow { width: auto; }
th, td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left;
         vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.clusters td.num, table.clusters th.num { width: 5.5em; }
tr.chosen { background: #fff3cd; font-weight: bold; }
section.cluster { border: 1px solid #e3e3e3; border-radius: 6px; padding: .2em 1em;
                  margin: 1em 0; }
.word { display: inline-block; background: #e8f0fe; border-radius: 4px; padding: 0 6px;
        margin: 2px; }
.sim { font-family: ui-monospace, monospace; color: #666; }
ol.docs li { margin: .3em 0; }
div.group { border-left: 3px solid #f0ad4e; padding-left: .8em; margin: .8em 0; }
"""


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
{body}
</body></html>
"""
