"""The documentation: every table comes from a benchmark record, every link of the README lands,
and nothing speaks of where or when in relative terms."""

import importlib.util
import json
import re

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load("render")


def test_every_marker_in_the_docs_renders_its_record_with_where_and_when():
    markers = [(page, name) for page in DOCS.glob("*.md")
               for name in render.MARKER.findall(page.read_text())]
    assert markers, "the docs show no benchmark table"
    for page, name in markers:
        record = json.loads((render.RESULTS / f"{name}.json").read_text())
        table = render.render(f"<!-- record: {name} -->")
        assert "<!-- record" not in table, page
        assert f"| {' | '.join(record['columns'])} |" in table
        assert table.count("\n| ") == len(record["rows"]) + 2  # header, rule, rows
        for fact in (record["date"], record["commit"], record["command"],
                     record["hardware"]["cpu"]["model"]):
            assert fact in table, (page, fact)


def test_a_marker_without_its_record_fails():
    with pytest.raises(render.MissingRecord, match="no_such_benchmark"):
        render.render("text\n<!-- record: no_such_benchmark -->\nmore")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")),
                         ids=lambda p: p.stem)
def test_each_record_says_where_when_and_how(path):
    record = json.loads(path.read_text())
    assert record["name"] == path.stem
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", record["date"])
    assert record["command"].startswith("python benchmarks/")
    assert record["commit"] and record["versions"]["torch"] and record["versions"]["python"]
    cpu = record["hardware"]["cpu"]
    assert cpu["model"] and cpu["cores"] >= 1 and isinstance(cpu["flags"], list)
    assert all(len(row) == len(record["columns"]) for row in record["rows"]), path


def test_record_writes_the_hardware_and_versions(tmp_path, monkeypatch):
    record = load("record")
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    path = record.write("example", "An example", ["a", "b"], [[1, 2.5]], ["a note"])
    written = json.loads(path.read_text())
    assert written["rows"] == [[1, 2.5]] and written["notes"] == ["a note"]
    assert written["versions"]["vaelab"] and written["hardware"]["cpu"]["model"]
    assert render.table(written).count("| 1 | 2.50 |") == 1


def test_the_readme_links_land_and_it_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))],
                         ids=lambda p: p.name)
def test_no_page_speaks_of_where_or_when_in_relative_terms(path):
    text = path.read_text()
    found = re.findall(r"\b(earlier session|this machine|a lent|in an earlier|later session|"
                       r"measured here|on this CPU)\b", text, flags=re.IGNORECASE)
    assert not found, found
