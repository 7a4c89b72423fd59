"""The `lambdabus` commands, one module per command group; `lambdabus_client.cli` builds the
parser and dispatches to them."""
