"""LUNA's lambda documentation: `docs/lambda.html` and `docs/lambda.yml` from a function's
source archive, served as they are under a Content-Security-Policy that runs no script.

The archive is read back from the artifact store on the first request for a source and the
two files are kept (a small cache keyed by the source's sha256: a new source is a new key).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lambdabus_events.models import FunctionRecord
from lambdabus_platform.archive import ArchiveLimits, read_files
from lambdabus_platform.errors import ArchiveError, NotFound

DOCS_HTML = "docs/lambda.html"
DOCS_YAML = "docs/lambda.yml"
MAX_DOC_BYTES = 5 * 1024 * 1024
# No script, no frame, no form, no fetch; inline styles and data: images only. `sandbox`
# also gives the page an opaque origin: nothing it holds can reach the gateway's.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {
    DOCS_HTML: "text/html; charset=utf-8",
    DOCS_YAML: "application/yaml; charset=utf-8",
}


class NoDocs(NotFound):
    code = "no_docs"


@dataclass
class FunctionDocs:
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    cache_size: int = 64
    _cache: OrderedDict[str, dict[str, bytes]] = field(default_factory=OrderedDict)

    async def get(
        self, record: FunctionRecord, archive: Callable[[], Awaitable[bytes]], path: str
    ) -> bytes:
        """One of the two documentation files of the function's current source; `NoDocs`
        when its archive has none (or is not a zip: LUNA's docs come in a zip)."""
        key = record.source.sha256
        files = self._cache.get(key)
        if files is None:
            data = await archive()
            try:
                files = await asyncio.to_thread(
                    read_files, data, (DOCS_HTML, DOCS_YAML), self.limits, MAX_DOC_BYTES
                )
            except ArchiveError:
                files = {}
            self._cache[key] = files
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if path not in files:
            raise NoDocs(
                f"function {record.namespace}/{record.name} has no documentation: add "
                f"{DOCS_HTML} and {DOCS_YAML} to its archive",
                details={"files": [DOCS_HTML, DOCS_YAML]},
            )
        return files[path]
