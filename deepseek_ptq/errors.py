"""Errors a user can fix: one message that names the problem and what to do."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the run stops before (or instead of) doing work, with a message for the user."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        self.logged = False  # set once the console has it, so that it is said once
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)
