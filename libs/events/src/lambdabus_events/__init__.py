"""lambdabus_events."""
