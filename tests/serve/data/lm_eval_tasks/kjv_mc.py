"""Loader of the `hybridlm_kjv_mc` task: the JSONL file next to this one, as the task's `test` split.

`extra_docs`, the path of another JSONL file of documents of the same shape, appends them (pass it
as lm-eval metadata: `TaskManager(metadata={"extra_docs": path})` or `--metadata '{"extra_docs": ...}'`).

(A `custom_dataset` rather than `dataset_path: json` + `data_files`, whose relative paths
the `datasets` library resolves against the working directory, not the YAML's folder.)
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).with_name("kjv_mc.jsonl")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load(extra_docs: str | None = None, **_metadata) -> datasets.DatasetDict:
    """lm-eval calls this with the task's metadata (and dataset_kwargs) as keyword arguments."""
    rows = read_jsonl(DATA) + (read_jsonl(extra_docs) if extra_docs else [])
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
