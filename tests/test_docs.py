"""The docs against the code: the options tables against ``AfterKernelCallback``'s docstring and signature, and the
README's links and commands against the files and parsers they name."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.reporting.commands import report_parser, reproduce_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER_GUIDE = ROOT / "docs" / "user_guide.md"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def docstring_args(obj: object) -> list[str]:
    """The names in the Google-style ``Args:`` section of ``obj``'s docstring, in order."""
    lines = inspect.getdoc(obj).splitlines()
    start = lines.index("Args:") + 1
    names = []
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        match = re.match(r"^ {4}(\w+):", line)
        if match:
            names.append(match.group(1))
    return names


def option_rows(markdown: str, header: str) -> dict[str, str]:
    """``{name: default}`` from every markdown table whose header row starts with ``| <header> |``: the first two
    cells, each one backticked literal."""
    rows: dict[str, str] = {}
    in_table = False
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_table = False
        elif cells[0] == header:
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            name, default = (re.fullmatch(r"`([^`]*)`", c) for c in cells[:2])
            assert name and default, f"row {line!r}: the name and the default must each be one `literal`"
            assert name.group(1) not in rows, f"{name.group(1)} appears twice"
            rows[name.group(1)] = default.group(1)
    return rows


def section(markdown: str, title: str) -> str:
    """The text of the ``## <title>`` section."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


PARAMETERS = {
    name: p.default for name, p in inspect.signature(AfterKernelCallback).parameters.items() if name != "self"
}
TABLES = {
    "README": lambda: option_rows(README.read_text(), "`AfterKernelCallback` argument"),
    "user guide §3": lambda: option_rows(section(USER_GUIDE.read_text(), "3. `AfterKernelCallback` options"), "option"),
}


def test_docstring_documents_every_argument() -> None:
    args = docstring_args(AfterKernelCallback)
    assert len(args) == len(set(args))
    assert set(args) == set(PARAMETERS)


@pytest.mark.parametrize("doc", TABLES)
def test_options_table_names_the_docstring_arguments(doc: str) -> None:
    table = TABLES[doc]()
    args = set(docstring_args(AfterKernelCallback))
    assert not set(table) - args, f"{doc} lists arguments the docstring does not: {sorted(set(table) - args)}"
    assert not args - set(table), f"{doc} lacks arguments of the docstring: {sorted(args - set(table))}"


@pytest.mark.parametrize("doc", TABLES)
def test_options_table_defaults_are_the_signature_defaults(doc: str) -> None:
    for name, default in TABLES[doc]().items():
        assert ast.literal_eval(default) == PARAMETERS[name], f"{doc}: {name} default {default}"


def test_option_rows_reads_only_option_tables() -> None:
    text = "| option | default | meaning |\n|---|---|---|\n| `a` | `1` | x |\n\n| field | meaning |\n| `b` | y |\n"
    assert option_rows(text, "option") == {"a": "1"}


def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", markdown, re.MULTILINE)}


def test_github_anchor() -> None:
    assert github_anchor("3. `AfterKernelCallback` options") == "3-afterkernelcallback-options"
    assert github_anchor("5. Weights & Biases") == "5-weights--biases"
    assert github_anchor("Kernels (`lightning_afterkernel/kernels/`)") == "kernels-lightning_afterkernelkernels"


def test_readme_links_resolve() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links no docs"
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README links {link}: {path} does not exist"
        if anchor:
            assert anchor in anchors(target.read_text()), f"README links {link}: no such heading in {path}"


def readme_commands() -> list[list[str]]:
    """The command lines of the README's ``bash`` blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_commands_parse() -> None:
    commands = readme_commands()
    makefile = (ROOT / "Makefile").read_text()
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    for command in commands:
        if command[0] == "make":
            assert re.search(rf"^{command[1]}:", makefile, re.MULTILINE), f"no Makefile target {command[1]}"
            continue
        assert command[:3] == ["python", "-m", "lightning_afterkernel"], command
        name, rest = command[3], command[4:]
        if name == "reproduce":
            assert reproduce_parser().parse_args(rest).out
        elif name == "report":
            assert report_parser().parse_args(rest).runs
        else:
            assert name in LIGHTNING_COMMANDS, command
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    demo = re.search(r"^demo:.*\n\t(.*)$", makefile, re.MULTILINE).group(1)
    assert "lightning_afterkernel fit --config configs/quickstart.yaml" in demo
    assert "`python -m lightning_afterkernel fit --config configs/quickstart.yaml`" in README.read_text()
