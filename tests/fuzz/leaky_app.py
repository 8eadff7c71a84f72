"""A deliberately wrong API for tests/fuzz/test_st_hooks.py: it writes a row and then
refuses the request. The fuzz run's database check must catch it."""

from __future__ import annotations

import os
import sqlite3

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

app = FastAPI()
DB = os.environ["LEAKY_DB"]


class Thing(BaseModel):
    name: str


@app.post("/things", responses={422: {"description": "refused"}})
def add_thing(thing: Thing) -> JSONResponse:
    with sqlite3.connect(DB) as conn:
        conn.execute("INSERT INTO thing (name) VALUES (?)", (thing.name,))
    return JSONResponse({"detail": "refused after writing"}, status_code=422)
