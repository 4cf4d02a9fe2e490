"""sources.yaml: the sources of a data mixture, one entry per source.

    sources:
      - name: web
        inputs: [data/web/*.jsonl.zst]
        text_field: text        # jsonl key / Parquet column (default: text)
        weight: 0.7             # share of training samples (normalized over the sources)
        dedup: exact            # exact (default) | minhash | none
      - name: books
        inputs: [data/books/]
        weight: 0.3
        split_blank_lines: true # in .txt files each blank-line-separated block is a document

Relative input paths are relative to the file's directory. Errors name the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pocketlm.errors import PocketLMError

DEDUP_MODES = ("exact", "minhash", "none")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourcesError(PocketLMError):
    pass


@dataclass
class Source:
    name: str
    inputs: list[str]
    text_field: str = "text"
    weight: float = 1.0
    dedup: str = "exact"
    split_blank_lines: bool = False
    subdir: str = field(default="", compare=False)  # where its shards go under the output directory


def _check(source: Source, where) -> Source:
    if not NAME_RE.match(source.name) or source.name == "tokenizer":
        raise SourcesError(f"{where('name')}: name: expected letters, digits, '_', '.' or '-' (and not 'tokenizer', "
                           f"the output's tokenizer folder), got {source.name!r}")
    if not isinstance(source.inputs, list) or not source.inputs or not all(isinstance(i, str) for i in source.inputs):
        raise SourcesError(f"{where('inputs')}: inputs: expected a non-empty list of files, directories or globs")
    if not isinstance(source.text_field, str) or not source.text_field:
        raise SourcesError(f"{where('text_field')}: text_field: expected a field name")
    if isinstance(source.weight, bool) or not isinstance(source.weight, (int, float)) or not source.weight > 0:
        raise SourcesError(f"{where('weight')}: weight: expected a number > 0, got {source.weight!r}")
    if source.dedup not in DEDUP_MODES:
        raise SourcesError(f"{where('dedup')}: dedup: expected one of {', '.join(DEDUP_MODES)}, got {source.dedup!r}")
    if not isinstance(source.split_blank_lines, bool):
        raise SourcesError(f"{where('split_blank_lines')}: split_blank_lines: expected true or false")
    return source


def load_sources(path) -> list[Source]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourcesError(f"{path}: no such file") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes keep their line numbers for errors
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SourcesError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    top = {k.value: v for k, v in root.value} if isinstance(root, yaml.MappingNode) else {}
    seq = top.get("sources")
    if not isinstance(seq, yaml.SequenceNode) or not seq.value:
        line = seq.start_mark.line + 1 if seq is not None else 1
        raise SourcesError(f"{path}:{line}: sources: expected a non-empty list of sources under 'sources:'")
    unknown_top = set(top) - {"sources"}
    if unknown_top:
        raise SourcesError(f"{path}:{top[sorted(unknown_top)[0]].start_mark.line + 1}: unknown key {sorted(unknown_top)[0]!r} "
                           "(expected only 'sources')")
    construct = yaml.SafeLoader("").construct_object
    known = set(Source.__dataclass_fields__) - {"subdir"}
    sources: list[Source] = []
    for i, node in enumerate(seq.value):
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise SourcesError(f"{path}:{line}: sources[{i}]: expected a mapping with name, inputs, weight, ...")
        fields = {k.value: (k.start_mark.line + 1, construct(v, deep=True)) for k, v in node.value}
        for key, (kline, _) in fields.items():
            if key not in known:
                raise SourcesError(f"{path}:{kline}: sources[{i}]: unknown field {key!r} (expected {', '.join(sorted(known))})")
        for key in ("name", "inputs"):
            if key not in fields:
                raise SourcesError(f"{path}:{line}: sources[{i}]: missing field {key!r}")
        values = {k: v for k, (_, v) in fields.items()}
        if isinstance(values["inputs"], str):
            values["inputs"] = [values["inputs"]]
        name = values.get("name")
        where = lambda key, i=i, name=name, fields=fields, line=line: \
            f"{path}:{fields.get(key, (line,))[0]}: sources[{i}] ({name})"  # noqa: E731
        if not isinstance(name, str):
            raise SourcesError(f"{where('name')}: name: expected a string")
        source = _check(Source(**values), where)
        if any(s.name == source.name for s in sources):
            raise SourcesError(f"{where('name')}: name: {source.name!r} is used twice")
        source.inputs = [str(p if Path(p).is_absolute() else path.parent / p) for p in source.inputs]
        source.subdir = source.name
        sources.append(source)
    return sources
