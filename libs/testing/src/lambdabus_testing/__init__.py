"""lambdabus_testing."""
