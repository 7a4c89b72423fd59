"""lambdabus_builder."""
