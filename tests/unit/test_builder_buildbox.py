"""The build sandbox's view (pure): what a build step sees, in which order."""

from __future__ import annotations

from pathlib import Path

from lambdabus_builder.buildbox import PATH, TOOLS_DIR, build_step, install_prefix, network_env
from lambdabus_platform.sandbox import Bind


def test_a_build_step_sees_scratch_sources_tools_and_its_stage() -> None:
    spec = build_step(
        ["/lambdabus/bin/uv", "pip", "install"],
        stage="/srv/lb/builder/envs/.tmp-k-1",
        scratch="/srv/lb/builder/envs/.tmp-k-1/scratch",
        chdir="/srv/lb/builder/envs/.tmp-k-1/env",
        network="none",
        read_only=[
            "/opt/wheels",
            "/usr/lib/python3",
            "/root/.pyenv/versions/3.11.7",
            "/opt/wheels",
        ],
        files={f"{TOOLS_DIR}/uv": "/work/repo/.venv/bin/uv"},
        env={"UV_CACHE_DIR": "/tmp/uv-cache"},
    )
    assert spec.binds == (
        Bind("/srv/lb/builder/envs/.tmp-k-1/scratch", "/tmp", writable=True),  # first
        Bind("/opt/wheels", "/opt/wheels"),
        Bind("/root/.pyenv/versions/3.11.7", "/root/.pyenv/versions/3.11.7"),
        Bind("/work/repo/.venv/bin/uv", f"{TOOLS_DIR}/uv"),
        Bind("/srv/lb/builder/envs/.tmp-k-1", "/srv/lb/builder/envs/.tmp-k-1", writable=True),
    )
    assert dict(spec.env) == {
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "PATH": PATH,
        "LANG": "C.UTF-8",
        "UV_CACHE_DIR": "/tmp/uv-cache",
    }
    assert (spec.network, spec.chdir) == ("none", "/srv/lb/builder/envs/.tmp-k-1/env")
    # nothing else of the host: no state dir, no repo checkout, no /root beyond the interpreter
    sources = {b.source for b in spec.binds}
    assert not any(s in ("/srv/lb", "/srv/lb/builder", "/work/repo", "/root") for s in sources)


def test_install_prefix() -> None:
    assert install_prefix("/usr/bin/python3.11") is None
    assert install_prefix("/root/.pyenv/versions/3.11.7/bin/python3.11") == (
        "/root/.pyenv/versions/3.11.7"
    )
    assert install_prefix("/opt/node/node") == "/opt/node"


def test_networked_steps_get_the_operators_tls_trust_and_proxy_only(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env, paths = network_env(
        {
            "SSL_CERT_FILE": str(ca),
            "SSL_CERT_DIR": "/etc/ssl/certs",
            "HTTPS_PROXY": "http://proxy.example:3128",
            "NODE_EXTRA_CA_CERTS": str(tmp_path / "missing.pem"),
            "AWS_SECRET_ACCESS_KEY": "nope",
            "LD_PRELOAD": "/tmp/evil.so",
        }
    )
    assert env == {
        "SSL_CERT_FILE": str(ca),
        "SSL_CERT_DIR": "/etc/ssl/certs",
        "HTTPS_PROXY": "http://proxy.example:3128",
        "NODE_EXTRA_CA_CERTS": str(tmp_path / "missing.pem"),
    }
    assert str(ca) in paths  # bound read-only into the sandbox
    assert str(tmp_path / "missing.pem") not in paths
