"""lambdabus_gateway."""
