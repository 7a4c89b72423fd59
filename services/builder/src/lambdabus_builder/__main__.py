"""`python -m lambdabus_builder`: run the builder service (see `lambdabus_builder.builds`)."""

from __future__ import annotations

from lambdabus_builder.service import make_setup
from lambdabus_builder.settings import BuilderSettings
from lambdabus_platform.service import run


def main() -> int:
    settings = BuilderSettings()
    return run("builder", settings, make_setup(settings))


if __name__ == "__main__":
    raise SystemExit(main())
