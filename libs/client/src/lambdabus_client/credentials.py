"""`lambdabus credentials audit`: where an outside NATS client audits the platform from — the
URL of the embedded NATS that `lambdabus up` runs and the `auditor` user's nkey seed file, which
may only consume the LIFECYCLE stream (see `lambdabus_platform.natsauth`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class NoCredentials(Exception):
    """`lambdabus up` never ran with this data dir (or its NATS key is gone)."""


@dataclass(frozen=True)
class AuditAccess:
    url: str
    nkey_seed_file: Path


def audit_access(data_dir: Path) -> AuditAccess:
    """The auditor's URL and seed file under `data_dir` (as `lambdabus up` made them)."""
    store = data_dir / "nats"
    seed = (store / "credentials" / "auditor.nk").resolve()
    url = store / "url"
    if not seed.is_file() or not url.is_file():
        raise NoCredentials(
            f"no NATS credentials under {data_dir}: run 'lambdabus up' there first "
            "(or pass --data-dir); an external NATS's operator hands out its own"
        )
    return AuditAccess(url.read_text().strip(), seed)
