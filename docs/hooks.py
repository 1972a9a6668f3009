"""mkdocs hooks: the reference tables generated from the code when the site is built (so they cannot
drift from it), and the repository's BENCHMARKS.md served as a page of the site."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import typing
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    return text.replace("|", "\\|")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default}`" if isinstance(field.default, Path) else f"`{field.default!r}`"


def params_comments() -> dict[str, str]:
    """The comment on each key's line of the shipped params.yaml, by dotted key."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (ROOT / "params.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if "#" in rest:
            out[dotted] = rest.split("#", 1)[1].strip()
        stack.append((indent, key))
    return out


def _rows(model: type[BaseModel], prefix: str, comments: dict[str, str]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        sub = next((a for a in typing.get_args(annotation) or (annotation,)
                    if inspect.isclass(a) and issubclass(a, BaseModel)), None)
        if sub is not None:
            rows.extend(_rows(sub, key + ".", comments))
            continue
        what = (field.description or comments.get(key, "")).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(annotation)} | {_default(field)} | {what} |")
    return rows


def config_table() -> str:
    from fedcmi.config import Config
    from fedcmi.registry import ALGORITHMS, DATASETS, RULES

    comments = params_comments()
    head = "| key | type | default | meaning |\n|---|---|---|---|\n"
    parts = ["## The settings\n\n" + head + "\n".join(_rows(Config, "", comments))]
    for where, registry in (("algorithm", ALGORITHMS), ("server", RULES), ("data", DATASETS)):
        for name, cls in sorted(registry.all().items()):
            options = getattr(cls, "Options", None)
            if options is None:
                continue
            section = f"{where}.{getattr(cls, 'section', None) or name}"
            parts.append(f"## `{section}` ({registry.kind} `{name}`)\n\n{head}"
                         + "\n".join(_rows(options, section + ".", comments)))
    return "\n\n".join(parts)


def error_table() -> str:
    import fedcmi
    from fedcmi.errors import FedcmiError

    for info in pkgutil.walk_packages(fedcmi.__path__, "fedcmi."):
        importlib.import_module(info.name)
    found: set[type] = set()
    todo: list[type] = [FedcmiError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    rows = [f"| `{c.__module__}.{c.__name__}` | {c.exit_code} | {(c.__doc__ or '').strip().splitlines()[0]} |"
            for c in sorted(found, key=lambda c: (c.__module__, c.__name__))]
    return "| error | exit code | when |\n|---|---|---|\n" + "\n".join(rows)


def on_files(files: Files, config: Any) -> Files:
    text = (ROOT / "BENCHMARKS.md").read_text()
    # links into docs/ are the repository's view; on the site the page sits beside those pages
    files.append(File.generated(config, "benchmarks.md", content=re.sub(r"\]\(docs/", "](", text)))
    # the tables and plots it links, from the repository's results folders
    targets = set(re.findall(r"\]\((benchmarks/results/[^)#\s]+)", text))
    for page in [t for t in targets if t.endswith(".md") and (ROOT / t).is_file()]:  # and what those pages show
        folder = Path(page).parent
        targets |= {str(folder / link) for link in re.findall(r"\]\(([^):#\s/]+)\)", (ROOT / page).read_text())}
    for target in sorted(targets):
        if (ROOT / target).is_file():
            files.append(File(target, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if "{{ config_table }}" in markdown:
        markdown = markdown.replace("{{ config_table }}", config_table())
    if "{{ error_table }}" in markdown:
        markdown = markdown.replace("{{ error_table }}", error_table())
    return markdown
