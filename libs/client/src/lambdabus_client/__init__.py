"""lambdabus_client."""
