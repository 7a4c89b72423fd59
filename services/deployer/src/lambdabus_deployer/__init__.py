"""lambdabus_deployer."""
