"""`credentials audit`."""

from __future__ import annotations

import argparse

from lambdabus_client.client import (
    ClientSettings,
)
from lambdabus_client.commands.common import (
    _fail,
    print_data,
)


async def _credentials(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    from lambdabus_client.credentials import NoCredentials, audit_access
    from lambdabus_platform.launcher import UpSettings

    data_dir = args.data_dir if args.data_dir is not None else UpSettings().data_dir
    try:
        access = audit_access(data_dir)
    except NoCredentials as error:
        return _fail("no_credentials", str(error), 1)
    if output != "table":
        print_data(output, {"url": access.url, "nkey_seed_file": str(access.nkey_seed_file)})
        return 0
    print(f"url   {access.url}")
    print(f"nkey  {access.nkey_seed_file}")
    return 0
