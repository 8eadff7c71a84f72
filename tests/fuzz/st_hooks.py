"""Schemathesis hooks for tests/fuzz (loaded by the `st` process through SCHEMATHESIS_HOOKS).

Two additions to Schemathesis's own checks:

- Path ids are drawn from the objects the test made as often as at random, so generated
  requests reach the rules behind the 404s (an id is a random integer otherwise, and almost
  every request would stop at "not found").
- `refused_request_changes_nothing`: the whole database is read before each request and
  compared after every 4xx answer. A refused request may not change anything.

Environment: FUZZ_IDS (JSON: path parameter name -> existing ids) and FUZZ_DB_URL (the
database the server under test uses).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import schemathesis
from hypothesis import strategies as st
from support.dbsnapshot import changed_tables, snapshot

IDS: dict[str, list[int]] = json.loads(os.environ.get("FUZZ_IDS", "{}"))
DB_URL = os.environ["FUZZ_DB_URL"]
_before: dict[str, str] = {}


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, path: dict[str, Any] | None) -> Any:
    if not path:
        return st.just(path)
    known = {k: IDS[k] for k in path if IDS.get(k)}
    if not known:
        return st.just(path)
    existing = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in known.items()})
    return st.one_of(st.just(path), existing.map(lambda ids: {**path, **ids}))


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    _before.clear()
    _before.update(snapshot(DB_URL))


@schemathesis.check
def refused_request_changes_nothing(ctx: Any, response: Any, case: Any) -> bool | None:
    if not 400 <= response.status_code < 500 or not _before:
        return None
    changed = changed_tables(_before, snapshot(DB_URL))
    if changed:
        raise AssertionError(
            f"{case.method} {urlsplit(str(response.request.url)).path} answered "
            f"{response.status_code} but changed the tables {changed}"
        )
    return None
