"""The documentation's result tables, rendered from the records in benchmarks/results/.

A page asks for a table with a marker on a line of its own, `<!-- record: cli_startup -->`; this
MkDocs hook (mkdocs.yml: `hooks`) replaces it with the record's table and a line saying where,
when and how it was measured. A marker whose record is missing fails the build, so no table in the
docs can outlive its record or be typed by hand.

    python benchmarks/render.py                 # every record's table, as Markdown, on stdout
    python benchmarks/render.py cli_startup     # one
"""

import json
import re
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MARKER = re.compile(r"^<!-- record: ([\w-]+) -->$", re.MULTILINE)


class MissingRecord(Exception):
    """A page asks for a record that benchmarks/results/ does not hold."""


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise MissingRecord(f"no record {path.name} in {RESULTS}: run the benchmark that writes "
                            f"it, or remove the marker")
    return json.loads(path.read_text())


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def provenance(record: dict[str, Any]) -> str:
    hardware = record["hardware"]
    cpu = hardware["cpu"]
    where = (f"{hardware['gpu']} (host: {cpu['model']})" if hardware.get("gpu") else
             f"{cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or 'none'}")
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return (f"Measured {record['date']} on {where}; {versions}; commit `{record['commit']}`; "
            f"`{record['command']}`.")


def table(record: dict[str, Any]) -> str:
    lines = [f"**{record['title']}**", "",
             "| " + " | ".join(record["columns"]) + " |",
             "| " + " | ".join("---" for _ in record["columns"]) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in record["rows"]]
    lines += ["", *(f"{note}" for note in record.get("notes", [])), "",
              f"<small>{provenance(record)}</small>", ""]
    return "\n".join(lines)


def render(markdown: str) -> str:
    """Every marker of a page replaced by its record's table."""
    return MARKER.sub(lambda m: table(load(m.group(1))), markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:  # the MkDocs hook
    try:
        return render(markdown)
    except MissingRecord as err:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{kwargs['page'].file.src_path}: {err}") from None


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.stem for p in RESULTS.glob("*.json"))
    print("\n".join(table(load(name)) for name in names))
