"""HiSo on Flower: the example app (see the pyproject.toml beside this package and docs/scaling.md)."""
