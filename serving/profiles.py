"""What the privacy gate needs about a person besides the ledger: the declared date of birth.

Loaded from the ``users`` event table once at start (vectorised, one dict), refreshed with the
recommender snapshot. A person not in the table has no declared date of birth, which the gate
treats as "not shown to be an adult" for profiling.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from features.privacy.gate import SubjectProfile


class ProfileStore:
    def __init__(self) -> None:
        self._dob: dict[str, dt.date] = {}

    def load(self, events_dir: Path) -> int:
        from features.storage import read_table, table_path

        if not table_path(events_dir, "users").exists():
            return 0
        users = read_table(events_dir, "users", ["user_id", "date_of_birth"]).dropna(subset=["date_of_birth"])
        self._dob = dict(zip(users["user_id"].astype(str), users["date_of_birth"], strict=True))
        return len(self._dob)

    def set(self, user_id: str, date_of_birth: dt.date | None) -> None:
        if date_of_birth is None:
            self._dob.pop(user_id, None)
        else:
            self._dob[user_id] = date_of_birth

    def profile(self, user_id: str) -> SubjectProfile:
        return SubjectProfile(user_id, self._dob.get(user_id))
