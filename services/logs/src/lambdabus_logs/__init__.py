"""lambdabus_logs."""
