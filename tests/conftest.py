"""Fixtures for every suite come from the lambdabus-testing lib."""

pytest_plugins = [
    "lambdabus_testing.fixtures",
    "lambdabus_testing.s3server",
    "lambdabus_testing.wheels",
]
