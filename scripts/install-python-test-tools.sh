#!/usr/bin/env bash
# Installs the Python checkers that tests/admin.rs and tests/metrics.rs run, into the venv
# <repo>/.tools/testenv (gitignored):
#
#   openapi-spec-validator    validates /openapi.json as an OpenAPI 3.1 document
#   openapi-schema-validator  validates admin JSON answers against the document's schemas
#   prometheus-client         its strict OpenMetrics parser
#                             (prometheus_client.openmetrics.parser.text_string_to_metric_families)
#
# `promtool` is not here: it comes from the Debian package `prometheus` (see .ci/run).
#
# Idempotent: a venv already holding the pinned versions is left alone, so a second run only
# re-checks the imports (about two seconds). Needs python3 with venv and pip, and a
# reachable PyPI; nothing else.
# Usage: scripts/install-python-test-tools.sh [--force]
set -euo pipefail

# Pinned so that a CI run is reproducible; bump deliberately (and together: the spec
# validator requires a matching schema validator).
OPENAPI_SPEC_VALIDATOR_VERSION="0.9.0"
OPENAPI_SCHEMA_VALIDATOR_VERSION="0.9.0"
PROMETHEUS_CLIENT_VERSION="0.26.0"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
venv="${repo_root}/.tools/testenv"
python="${venv}/bin/python3"

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
fi

log() { printf 'install-python-test-tools: %s\n' "$*" >&2; }

want="openapi-spec-validator==${OPENAPI_SPEC_VALIDATOR_VERSION}"
want+=" openapi-schema-validator==${OPENAPI_SCHEMA_VALIDATOR_VERSION}"
want+=" prometheus-client==${PROMETHEUS_CLIENT_VERSION}"
stamp="${venv}/.sprint-sidecar-stamp"

if [[ ${force} -eq 1 || ! -x "${python}" || "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
    log "creating ${venv} with ${want}"
    rm -rf "${venv}"
    mkdir -p "$(dirname "${venv}")"
    python3 -m venv "${venv}"
    # shellcheck disable=SC2086 # the list is meant to split into arguments
    "${python}" -m pip install --quiet --disable-pip-version-check --no-input ${want}
    printf '%s' "${want}" >"${stamp}"
else
    log "venv up to date (${want})"
fi

# Prove each tool imports and runs, so a broken install fails here and not in a test.
"${python}" - <<'PY'
import importlib.metadata as md

import openapi_schema_validator  # noqa: F401
import openapi_spec_validator  # noqa: F401
from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = list(text_string_to_metric_families("# TYPE up gauge\nup 1\n# EOF\n"))
assert families and families[0].name == "up", families
print(
    "install-python-test-tools: ready:",
    ", ".join(
        f"{name} {md.version(name)}"
        for name in ("openapi-spec-validator", "openapi-schema-validator", "prometheus-client")
    ),
)
PY
"${venv}/bin/openapi-spec-validator" --help >/dev/null
