"""Purpose limitation, consent and data-subject rights.

`registry` is the single declarative source of truth (purposes, legal bases, categories,
tiers); `ledger` the append-only consent record; `gate` picks the richest tier a person
allows right now; `pit_consent` applies the same rules to training examples at their own
time; `rights`, `erasure` and `retention` implement access, erasure, restriction, objection
and storage limitation. Nothing heavy is imported here.
"""
