"""Evaluation shared by training (end-of-run summary) and commands (``inspect-memory --eval``)."""
