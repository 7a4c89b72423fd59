"""`python -m lambdabus_client`: the `lambdabus` CLI."""

from lambdabus_client.cli import main

raise SystemExit(main())
