"""lambdabus_platform."""
