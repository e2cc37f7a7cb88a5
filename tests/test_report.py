"""Report rendering: ordering, escaping, and the pages opening in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_cluster import topic_corpus, write_index  # the known-topics index folder

from pipeline.analysis import cluster, report


def grouped_sentences():
    """Three topics of four sentences, interleaved so that the input order shows no blocks."""
    topics = [["The cat sleeps on the sofa", "A kitten naps in the sun",
               "My cat is asleep", "The dog and cat rest"],
              ["Stocks fell sharply today", "The market dropped", "Shares lost value",
               "Investors sold <b>bonds</b>"],
              ["Rain is expected tomorrow", "A storm is coming", "Cloudy with showers",
               "The forecast says rain"]]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    sentences, vectors, group = [], [], []
    for i in range(4):
        for t in range(3):
            sentences.append(topics[t][i])
            vectors.append(centres[t] + 0.15 * rng.standard_normal(16))
            group.append(t)
    vectors = np.array(vectors)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return sentences, vectors @ vectors.T, np.array(group)


def test_hierarchical_order_makes_blocks():
    _, sims, group = grouped_sentences()
    order = report.hierarchical_order(sims)
    assert sorted(order.tolist()) == list(range(12))
    runs = 1 + np.count_nonzero(np.diff(group[order]))
    assert runs == 3  # each topic's sentences sit next to each other
    distances = np.sqrt(np.clip(2 - 2 * sims, 0, None))  # euclidean between unit vectors
    order_d = report.hierarchical_order(distances, higher_is_similar=False)
    assert 1 + np.count_nonzero(np.diff(group[order_d])) == 3
    assert report.looks_like_similarity(sims) and not report.looks_like_similarity(distances)


def test_similarity_report_page(tmp_path):
    sentences, sims, _ = grouped_sentences()
    out = report.run_similarity_report(sentences, sims, tmp_path / "sim.html", "Demo & test")
    page = out.read_text()
    assert page.count("src='data:image/png;base64,") == 1
    assert "<title>Demo &amp; test</title>" in page
    assert "Investors sold &lt;b&gt;bonds&lt;/b&gt;" in page  # sentences are escaped
    assert len(re.findall(r"<tr><td class=num>", page)) == 12
    with pytest.raises(ValueError, match="sentences"):
        report.run_similarity_report(sentences[:3], sims, tmp_path / "x.html", "bad")


def test_markdown_and_html_escaping():
    doc = report.Document(3, "id|<x>", "a *b* | <script>alert(1)</script>", 0.9)
    section = report.ClusterSection(0, 1, 0.9, [("w|x", 1.0)], [doc], [])
    rep = report.ClusterReport("T", 1, 4, [section], facts={"a": "b"})
    html = report.render_cluster_html(rep)
    assert "<script>" not in html and "&lt;script&gt;" in html
    md = report.render_cluster_markdown(rep)
    assert "id\\|\\<x\\>" in md and "a \\*b\\* \\| \\<script\\>" in md
    assert "Not searched." in md and "Not searched." in html


def test_report_names_what_was_clustered():
    """"documents" by default; "rows" when `cluster --rows` clustered windows."""
    doc = report.Document(3, "d", "text", 0.9)
    section = report.ClusterSection(0, 7, 0.9, [("w", 1.0)], [doc], [])
    group = report.DuplicateGroup(2, [doc, doc], 0.99, 0.99)
    for unit in ("documents", "rows"):
        rep = report.ClusterReport("T", 7, 4, [section], duplicate_threshold=0.95,
                                   duplicate_pairs=1, duplicate_groups=[group],
                                   duplicate_groups_total=1, unit=unit)
        md, html = report.render_cluster_markdown(rep), report.render_cluster_html(rep)
        other = "rows" if unit == "documents" else "documents"
        for page in (md, html):
            assert f"7 {unit} " in page and f"2 {unit}" in page and f" {other} " not in page


# ---------------------------------------------------------------------------------------------
# A real browser: the pages must load with every image decoded and no errors.

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium); "
                             "cannot check that the HTML reports open in a browser")

# Added to a copy of the page under test only (the reports themselves carry no script): after
# load, count the images that decoded and the errors seen, and leave them on <body>.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || 'resource')), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const errors = window.__errors.length;
  document.body.setAttribute('data-probe', `images ${ok}/${imgs.length} errors ${errors}`);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=90)


def open_in_browser(page: Path, screenshot: Path) -> str:
    """The probe's verdict on `page`; a screenshot of the unmodified page to `screenshot`."""
    probe_page = page.with_name("probe-" + page.name)
    probe_page.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, f"page did not finish loading: {dom.stderr[-2000:]}"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", page.as_uri())
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
    return found.group(1)


@needs_chromium
def test_cluster_report_opens_in_chromium(tmp_path):
    x, _, texts = topic_corpus()
    index = write_index(tmp_path / "index", [f"doc-{r:03d}" for r in range(len(texts))], texts,
                        x, shard_rows=150)
    summary = cluster.run_cluster(index, "auto", tmp_path / "report", seed=0,
                                  near_duplicate_threshold=0.998, sample=10_000, console=None)
    verdict = open_in_browser(Path(summary["files"]["html"]), tmp_path / "cluster.png")
    assert verdict == "images 3/3 errors 0"  # the k curve, the map, the sizes


@needs_chromium
def test_similarity_report_opens_in_chromium(tmp_path):
    sentences, sims, _ = grouped_sentences()
    page = report.run_similarity_report(sentences, sims, tmp_path / "sim.html", "Similarity")
    assert open_in_browser(page, tmp_path / "sim.png") == "images 1/1 errors 0"
