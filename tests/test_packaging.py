"""The installed distribution: its own name (PyPI's `pipeline` is another project), the
`pipeline` command, and install hints that name extras which exist."""

from importlib.metadata import distribution

from pipeline.errors import DISTRIBUTION, pip_install


def test_distribution_has_its_own_name_and_the_pipeline_command():
    dist = distribution(DISTRIBUTION)
    assert dist.metadata["Name"] == DISTRIBUTION != "pipeline"
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"pipeline": "pipeline.cli:app"}


def test_install_hints_name_real_extras():
    extras = set(distribution(DISTRIBUTION).metadata.get_all("Provides-Extra"))
    for extra in ("report", "umap", "train"):
        assert extra in extras
        assert pip_install(extra) == f"pip install '{DISTRIBUTION}[{extra}]'"
