"""lambdabus_router."""
