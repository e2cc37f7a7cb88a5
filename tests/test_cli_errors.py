"""How the command line reports errors: a PipelineError is one line and exit code 1, with its
text printed as is (rich markup would read `[report]` as a tag and drop it); any other
exception is a bug and keeps its traceback."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import pipeline
from pipeline.cli.app import user_errors
from pipeline.errors import MissingExtra, PipelineError, UsageError, pip_install


def app_raising(error: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @user_errors
    def fail():
        raise error

    return app


@pytest.mark.parametrize("error", [
    UsageError("--out must end in .csv or .parquet"),
    MissingExtra(f"the heatmap needs scipy: {pip_install('report')}"),
    PipelineError("[bold]not bold[/bold] and [1] and C:\\path\\[x]"),
])
def test_pipeline_errors_are_one_verbatim_line(error):
    result = CliRunner().invoke(app_raising(error), [])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: {error}"]


def test_other_exceptions_keep_their_traceback():
    # A ValueError from deep inside a library is a bug, not bad input.
    result = CliRunner().invoke(app_raising(ValueError("shapes (3,) and (4,) not aligned")), [])
    assert isinstance(result.exception, ValueError)  # not turned into typer.Exit
    assert not result.output.startswith("error:")


def test_a_real_command_keeps_brackets_in_its_error(tmp_path):
    # End to end through the installed entry point: a path with brackets in an error message.
    missing = tmp_path / "[draft] notes.txt"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "similarity-matrix",
                             str(missing)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot read {missing}: no such file"
    assert "Traceback" not in result.stderr


def pipeline_import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports (at the top or inside functions)."""
    root = Path(pipeline.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(
        ".__init__"): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` never run: annotations only.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING"
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                for alias in node.names:  # `from pipeline.x import y`: y may be a module
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                              else base)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycles_in_the_package():
    graph = pipeline_import_graph()
    assert "pipeline.cli.app" in graph and "pipeline.embed.stage" in graph
    done, stack = set(), []

    def visit(module):
        if module in stack:
            cycle = stack[stack.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        stack.append(module)
        for other in sorted(graph[module]):
            # A package's __init__ importing its own submodules is how a package is built.
            if not other.startswith(module + "."):
                visit(other)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_help_texts_keep_their_brackets():
    """Typer renders help through rich markup: a `[umap]` in a help text must reach the
    screen, not be read as a tag and dropped."""
    import re

    import typer.main
    from typer.testing import CliRunner

    from pipeline.cli import app

    commands = typer.main.get_command(app).commands
    checked = 0
    for name, command in commands.items():
        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=400,
                                   env={"COLUMNS": "400"}).output
        for param in command.params:
            for bracketed in re.findall(r"\[[^\]\s]*\]", getattr(param, "help", None) or ""):
                checked += 1
                assert bracketed in shown, f"{name} {param.name}: {bracketed} is lost"
    assert checked >= 2  # --model's random:PRESET[:SEED] and --projection's [umap] at least


@pytest.mark.parametrize("width", [80, 200])
def test_help_paragraphs_flow_to_the_terminal_width(width):
    """Each paragraph of a command's description is wrapped to the terminal, not cut where
    the docstring's source lines end: at any width, no description line but a paragraph's
    last is much shorter than the terminal."""
    import inspect

    import typer.main
    from typer.testing import CliRunner

    from pipeline.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        doc = inspect.cleandoc(command.callback.__doc__ or "")
        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=width,
                                   env={"COLUMNS": str(width)}).output
        lines = "\n".join(line.rstrip() for line in shown.splitlines())  # rich pads lines
        description = lines.split("\n\n", 2)[-1].split("╭")[0]  # after the usage line
        for paragraph in description.strip("\n").split("\n\n"):
            lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
            for line, after in zip(lines, lines[1:], strict=False):
                # a wrapped line was full: the next word would not have fitted on it
                assert len(line) + 1 + len(after.split()[0]) > width - 4, (name, line, doc)
