"""Random and garbage rows thrown at the preference-file reader and row parser: every file either
loads or raises the project's own ``LoreDataError``, never an unrelated exception."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.preference_file import parse_rows
from datamodules.sources import read_records
from lore_pl import LoreDataError

COLUMNS = {"user_id": "user_id", "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
FIELDS = list(COLUMNS.values())

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["", " ", "\n\t", "yes", "no", "\ud800"]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3), max_leaves=8)
turns = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), junk),
                                            "content": st.one_of(st.text(max_size=10), junk)})
prompts = st.one_of(st.text(max_size=15), st.lists(turns, max_size=3), junk)
values = {"user_id": st.one_of(st.text(max_size=6), st.integers(), junk), "prompt": prompts,
          "chosen": st.one_of(st.text(max_size=10), junk), "rejected": st.one_of(st.text(max_size=10), junk)}
# rows: mostly objects with some documented fields (each possibly missing or wrong), sometimes not objects at all
objects = st.fixed_dictionaries({}, optional={**values, "extra": junk})
rows = st.one_of(objects, objects, objects, junk)


def check(path: Path, count: int | None = None) -> None:
    try:
        items, table = parse_rows(path, read_records(path), COLUMNS)
    except LoreDataError as error:
        assert str(path) in str(error)  # the message names the file
        return
    # loaded: one table row per record, and what the cache would store is writable UTF-8 JSON
    if count is not None:
        assert len(table["user"]) == count
    json.dumps([items, table], ensure_ascii=False, allow_nan=False).encode("utf-8")


fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fast
@given(records=st.lists(rows, min_size=0, max_size=6))
def test_jsonl_rows(tmp_path, records):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    nonblank = sum(1 for record in records if json.dumps(record).strip())
    check(path, nonblank)


@fast
@given(records=st.lists(rows, max_size=6))
def test_json_list(tmp_path, records):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(records))
    check(path, len(records))


@fast
@given(lines=st.lists(st.one_of(st.text(max_size=30), st.binary(max_size=30).map(lambda b: b.decode("latin-1"))),
                      max_size=5))
def test_garbage_jsonl_lines(tmp_path, lines):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    check(path)


@fast
@given(data=st.binary(max_size=64))
def test_garbage_bytes_in_every_format(tmp_path, data):
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        path = tmp_path / f"garbage{suffix}"
        path.write_bytes(data)
        check(path)


@fast
@given(records=st.lists(st.fixed_dictionaries({}, optional={f: st.one_of(st.text(max_size=8), st.integers(),
                                                                         st.floats()) for f in FIELDS}), max_size=5))
def test_csv_rows(tmp_path, records):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "rows.csv"
    pd.DataFrame(records, columns=FIELDS).to_csv(path, index=False)
    check(path)


def test_a_good_row_loads():
    """The fuzzers above would pass vacuously if nothing ever loaded: a valid file must."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ok.jsonl"
        path.write_text(json.dumps({"user_id": 3, "prompt": [{"role": "user", "content": "hi"}],
                                    "chosen": "a", "rejected": "b"}) + "\n")
        items, table = parse_rows(path, read_records(path), COLUMNS)
        assert table["user"] == ["3"] and len(items) == 2 and not math.isnan(len(items))
