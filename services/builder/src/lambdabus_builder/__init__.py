"""lambdabus_builder: turns a function's source archive into an artifact the deployer runs."""
