"""`kubectl explain sessionpolicy…` reads well: the real kubectl renders the CRD's schema.

kube-emulator serves discovery and the CRD but no OpenAPI schemas (its /openapi/v3 documents
only carry the PATCH parameters kubectl needs). A real API server publishes a CRD's
openAPIV3Schema in /openapi/v3/apis/{group}/{version} as a component named by the reversed
group, tagged with x-kubernetes-group-version-kind, with apiVersion/kind/metadata added
(k8s.io/apiextensions-apiserver's controller/openapi/builder). This test puts a small HTTP
proxy in front of the emulator that adds exactly that component, built from the CRD the
emulator stores, to the emulator's document and lets everything else through; kubectl does
the rest."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from binaries import binary, kubectl
from conftest import MINIMAL, of_kind, render, strip_meta
from test_emulator import Cluster
from test_rbac_e2e import wait_for

GROUP, VERSION, KIND = "sessions.blockyard.io", "v1alpha1", "SessionPolicy"
GV_PATH = f"/openapi/v3/apis/{GROUP}/{VERSION}"

# The texts the API server's builder gives the fields it adds to every CRD's schema.
API_VERSION_DOC = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values."
)
KIND_DOC = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this "
    "from the endpoint the client submits requests to. Cannot be updated. In CamelCase."
)
METADATA_DOC = "Standard object's metadata."


def crd_schema_component(crd: dict) -> tuple[str, dict]:
    """The component a real API server publishes for the CRD's kind: its name and schema."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    schema = json.loads(json.dumps(version["schema"]["openAPIV3Schema"]))
    schema["properties"] = {
        "apiVersion": {"type": "string", "description": API_VERSION_DOC},
        "kind": {"type": "string", "description": KIND_DOC},
        "metadata": {"type": "object", "description": METADATA_DOC},
        **schema["properties"],
    }
    schema["x-kubernetes-group-version-kind"] = [{"group": GROUP, "kind": KIND, "version": VERSION}]
    return ".".join(reversed(GROUP.split("."))) + f".{VERSION}.{KIND}", schema


class OpenApiProxy:
    """Forwards GETs to the emulator, adding the CRD's schema component to the emulator's own
    document at GV_PATH (whose paths kubectl uses to map the resource to its kind)."""

    def __init__(self, upstream: str, component: tuple[str, dict]) -> None:
        name, schema = component

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                request = urllib.request.Request(upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, content_type, data = response.status, response.headers.get("Content-Type", ""), response.read()
                except urllib.error.HTTPError as error:
                    status, content_type, data = error.code, error.headers.get("Content-Type", ""), error.read()
                if status == 200 and urllib.parse.urlsplit(self.path).path == GV_PATH:
                    document = json.loads(data)
                    document.setdefault("components", {}).setdefault("schemas", {})[name] = schema
                    content_type, data = "application/json", json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def explain(tmp_path_factory):
    emulator = binary("KUBE_EMULATOR_BIN", "kube-emulator")
    workdir = tmp_path_factory.mktemp("explain")
    kubeconfig = workdir / "kubeconfig"
    emu = subprocess.Popen(
        [str(emulator), "--listen", "127.0.0.1:0", "--kubeconfig-out", str(kubeconfig)],
        stdout=(workdir / "emulator.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    proxy = None
    try:
        wait_for("kube-emulator", kubeconfig.exists, 30)
        cluster = Cluster(kubeconfig)
        cluster.apply([strip_meta(d) for d in of_kind(render(MINIMAL), "CustomResourceDefinition")])
        crd = yaml.safe_load(cluster.run("get", "crd", f"sessionpolicies.{GROUP}", "-o", "yaml").stdout)
        config = yaml.safe_load(kubeconfig.read_text())
        proxy = OpenApiProxy(config["clusters"][0]["cluster"]["server"], crd_schema_component(crd))
        config["clusters"][0]["cluster"]["server"] = proxy.url
        proxied = workdir / "kubeconfig-explain"
        proxied.write_text(yaml.safe_dump(config))

        def run(*path: str, recursive: bool = False) -> str:
            args = [kubectl(), "--kubeconfig", str(proxied), "explain", ".".join(path)]
            if recursive:
                args.append("--recursive")
            proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"kubectl explain {'.'.join(path)}:\n{proc.stdout}{proc.stderr}"
            return proc.stdout

        yield run
    finally:
        if proxy is not None:
            proxy.close()
        emu.terminate()
        emu.wait(timeout=10)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_explain_the_kind(explain) -> None:
    out = explain("sessionpolicy")
    assert "Auto-generated" not in out, out
    assert "which pods of its namespace are session workers" in flat(out), out
    for field in ("spec", "status", "metadata"):
        assert f"\n  {field}\t" in out, out


def test_explain_spec_and_status(explain) -> None:
    spec = flat(explain("sessionpolicy", "spec"))
    assert "Which pods of this namespace are workers" in spec
    assert "How a worker id is derived from a pod" in spec
    status = flat(explain("sessionpolicy", "status"))
    assert "Observed state, written by the operator replica that holds the lease" in status
    assert "Worker pods selected by this policy, by state" in status
    ready = flat(explain("sessionpolicy", "status", "workers", "ready"))
    assert "Selected pods that are Ready and carry a worker id" in ready
    source = flat(explain("sessionpolicy", "spec", "workerId", "from"))
    assert "PodName" in source and "Annotation" in source


def test_every_field_kubectl_lists_has_a_description(explain) -> None:
    """Walks the field tree `kubectl explain --recursive` prints and explains every field."""
    tree = explain("sessionpolicy", recursive=True)
    fields = []
    stack: list[tuple[int, str]] = []
    in_fields = False
    for line in tree.splitlines():
        if line.startswith("FIELDS:"):
            in_fields = True
            continue
        match = re.match(r"^( +)([A-Za-z]\w*)\t<", line)
        if not in_fields or not match:
            continue  # blank lines, `enum: …` lines
        indent, name = len(match[1]), match[2]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, name))
        fields.append([n for _, n in stack])
    assert ["spec", "workerId", "from"] in fields and ["status", "conditions", "type"] in fields, tree
    lacking = []
    for path in fields:
        if path[0] in ("apiVersion", "kind", "metadata"):
            continue
        out = explain("sessionpolicy", *path)
        description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0]
        if not description.strip() or "<empty>" in description:
            lacking.append(".".join(path))
    assert not lacking, f"kubectl explain shows no description for: {lacking}"
