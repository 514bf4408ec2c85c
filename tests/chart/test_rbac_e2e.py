"""RBAC matches reality: the real operator runs against kube-emulator (with a real Postgres)
through a recording proxy, goes through two rolling replacements of worker pods, and every API
request it made is authorized against the chart's Roles/ClusterRoles and bindings the way the
API server's RBAC authorizer does it (verbs, resources, namespaces, resourceNames). The chart
must allow each request, and every rule and verb it grants must have been used (except those
in SITUATIONAL, each with the situation that needs it) — cluster-wide and namespaced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from typing import NamedTuple

import pytest
import yaml

from apiproxy import RecordingProxy
from binaries import binary, required
from conftest import MINIMAL, deep_merge, of_kind, render, strip_meta
from test_binary import deployment_container, process_env
from test_emulator import Cluster
from test_rbac import grants

NAMESPACE = "session-system"

# Granted by the chart but not necessarily exercised by this short scenario, each with the
# situation that needs it. Keep this empty unless a permission really cannot be provoked here.
SITUATIONAL: set[tuple[str, str, str]] = {
    # The event Recorder patches an Event when the same one repeats (same reason, same related
    # pod: late sessions of one worker, repeated idle sweeps or failures); each migration of the
    # scenario names its own departed pod, so nothing repeats within it.
    ("events.k8s.io", "events", "patch"),
}


class Request(NamedTuple):
    group: str
    resource: str  # resource[/subresource]
    verb: str
    namespace: str | None
    name: str | None


def parse_request(method: str, uri: str) -> Request | None:
    """One API request as RBAC sees it (k8s.io/apiserver's RequestInfo)."""
    url = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(url.query)
    parts = [p for p in url.path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return None  # /version, /healthz, /openapi: non-resource URLs
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        if len(parts) < 3:
            return None  # /apis, /apis/{group}: discovery
        group, rest = parts[1], parts[3:]
    if not rest:
        return None  # /api/v1, /apis/{group}/{version}: discovery
    watch = False
    if rest[0] == "watch":
        watch, rest = True, rest[1:]
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    if method == "GET":
        if watch or query.get("watch", ["false"])[0] in ("true", "1"):
            verb = "watch"
        else:
            verb = "get" if name else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]
    if verb in ("list", "watch") and name is None:
        # A list/watch selecting one name by field selector is authorized against that name.
        for selector in query.get("fieldSelector", []):
            for term in selector.split(","):
                key, _, value = term.partition("=")
                if key == "metadata.name" and value and not value.startswith("="):
                    name = value
    return Request(group, resource, verb, namespace, name)


def rules_in_force(docs: list[dict]) -> list[tuple[str | None, str, int, dict]]:
    """(namespace or None for cluster-wide, role name, rule index, rule) bound to the operator."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in of_kind(docs, "ClusterRole") + of_kind(docs, "Role")}
    (sa,) = of_kind(docs, "ServiceAccount")
    out = []
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
        if subject not in binding["subjects"]:
            continue
        scope = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        for index, rule in enumerate(role["rules"]):
            out.append((scope, f"{role['kind']}/{role['metadata'].get('namespace', '')}/{ref['name']}", index, rule))
    return out


def authorizing_rules(request: Request, rules) -> list[tuple[str, int, str]]:
    """(role, rule index, verb) of every rule that allows the request."""
    found = []
    for scope, role, index, rule in rules:
        if scope is not None and request.namespace != scope:
            continue
        if request.group not in rule["apiGroups"] or request.resource not in rule["resources"]:
            continue
        if request.verb not in rule["verbs"]:
            continue
        if rule.get("resourceNames") and request.name not in rule["resourceNames"]:
            continue
        found.append((role, index, request.verb))
    return found


def test_parse_request() -> None:
    assert parse_request("GET", "/api/v1/pods?watch=true&resourceVersion=1") == Request("", "pods", "watch", None, None)
    assert parse_request("GET", "/api/v1/namespaces/a/pods/p") == Request("", "pods", "get", "a", "p")
    assert parse_request(
        "PATCH", "/apis/sessions.blockyard.io/v1alpha1/namespaces/a/sessionpolicies/x/status?fieldManager=f"
    ) == Request("sessions.blockyard.io", "sessionpolicies/status", "patch", "a", "x")
    assert parse_request("POST", "/apis/events.k8s.io/v1/namespaces/a/events") == Request("events.k8s.io", "events", "create", "a", None)
    assert parse_request(
        "GET", "/apis/coordination.k8s.io/v1/namespaces/n/leases?&watch=true&fieldSelector=metadata.name%3Dl"
    ) == Request("coordination.k8s.io", "leases", "watch", "n", "l")
    assert parse_request("GET", "/apis/coordination.k8s.io/v1") is None
    assert parse_request("GET", "/version") is None


def test_authorizer_respects_namespaces_and_names() -> None:
    docs = render(deep_merge(MINIMAL, {"watchNamespaces": ["apps"]}), namespace=NAMESPACE)
    rules = rules_in_force(docs)
    assert authorizing_rules(Request("", "pods", "watch", "apps", None), rules)
    assert not authorizing_rules(Request("", "pods", "watch", None, None), rules)  # cluster-wide
    assert not authorizing_rules(Request("", "pods", "watch", "kube-system", None), rules)
    assert not authorizing_rules(Request("", "secrets", "get", "apps", "x"), rules)
    lease = Request("coordination.k8s.io", "leases", "patch", NAMESPACE, "so-session-operator")
    assert authorizing_rules(lease, rules)
    assert not authorizing_rules(lease._replace(name="other"), rules)
    assert not authorizing_rules(lease._replace(namespace="apps"), rules)
    assert authorizing_rules(lease._replace(verb="create", name=None), rules)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "apps", "labels": {"app": "shiny-worker"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "worker", "image": "worker:1"}]},
    }


def make_ready(cluster: Cluster, name: str) -> None:
    status = {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        }
    }
    cluster.run("-n", "apps", "patch", "pod", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def wait_for(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        message = "DATABASE_URL not set (scripts/test.sh provides a Postgres database)"
        if required():
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.mark.parametrize("watch", [[], ["apps"]], ids=["cluster-wide", "namespaced"])
def test_chart_rbac_is_what_the_operator_uses(database_url, tmp_path, watch) -> None:
    operator = binary("SESSION_OPERATOR_BIN", "the session-operator binary")
    emulator = binary("KUBE_EMULATOR_BIN", "kube-emulator")
    schema = f"chart_rbac_{os.getpid()}_{len(watch)}"
    values = deep_merge(
        MINIMAL, {"database": {"schema": schema}, "logging": {"format": "text"}, "watchNamespaces": watch}
    )
    docs = render(values, namespace=NAMESPACE)

    kubeconfig = tmp_path / "kubeconfig"
    log_path = tmp_path / "emulator.log"
    emu = subprocess.Popen(
        [str(emulator), "--listen", "127.0.0.1:0", "--kubeconfig-out", str(kubeconfig)],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    op = None
    proxy = None
    try:
        wait_for("kube-emulator", kubeconfig.exists, 30)
        cluster = Cluster(kubeconfig)
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (NAMESPACE, "apps")])
        cluster.apply([strip_meta(d) for d in of_kind(docs, "CustomResourceDefinition")])
        policy = {
            "apiVersion": "sessions.blockyard.io/v1alpha1",
            "kind": "SessionPolicy",
            "metadata": {"name": "shiny-workers", "namespace": "apps"},
            "spec": {
                "selector": {"matchLabels": {"app": "shiny-worker"}},
                "idleTTL": "30m",
                "idleSweepInterval": "1s",
                "migration": {"onReplace": "Reroute", "onTerminate": "Delete", "replacementWait": "5s"},
                "podDeletionCost": True,
            },
        }
        cluster.apply([policy, pod("w-a"), pod("w-b")])
        for name in ("w-a", "w-b"):
            make_ready(cluster, name)

        # The operator talks to the emulator through a recording proxy; kubectl does not.
        config = yaml.safe_load(kubeconfig.read_text())
        server = urllib.parse.urlsplit(config["clusters"][0]["cluster"]["server"])
        proxy = RecordingProxy(server.hostname, server.port).__enter__()
        config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{proxy.port}"
        operator_kubeconfig = tmp_path / "operator-kubeconfig"
        operator_kubeconfig.write_text(yaml.safe_dump(config))

        dep, container = deployment_container(docs)
        env = process_env(container, docs, "so-0", NAMESPACE)
        env.update(
            DATABASE_URL=database_url,
            KUBECONFIG=str(operator_kubeconfig),
            METRICS_ADDR=f"127.0.0.1:{free_port()}",
            HOME=str(tmp_path),
        )
        store_env = {k: env[k] for k in ("DATABASE_URL", "SESSION_SCHEMA", "PATH", "HOME")}
        subprocess.run([str(operator), "migrate"], env=store_env, check=True, capture_output=True, timeout=120)
        for session, worker in (("s1", "w-a"), ("s2", "w-a"), ("s3", "w-b")):
            subprocess.run(
                [str(operator), "sessions", "set", session, "--worker", worker],
                env=store_env, check=True, capture_output=True, timeout=60,
            )

        op_log = tmp_path / "operator.log"
        op = subprocess.Popen([str(operator), "run"], env=env, stdout=op_log.open("w"), stderr=subprocess.STDOUT)

        def lease_held() -> bool:
            proc = cluster.run("-n", NAMESPACE, "get", "lease", env["LEASE_NAME"], "-o", "json", check=False)
            return proc.returncode == 0 and json.loads(proc.stdout)["spec"].get("holderIdentity") == "so-0"

        wait_for("the lease", lease_held)
        # A rolling replacement: w-c becomes Ready, then w-a departs.
        cluster.apply([pod("w-c")])
        make_ready(cluster, "w-c")
        cluster.run("-n", "apps", "delete", "pod", "w-a", "--wait=false")

        def rerouted(session: str, worker: str) -> bool:
            out = subprocess.run(
                [str(operator), "sessions", "get", session, "-o", "json"],
                env=store_env, capture_output=True, text=True, timeout=60,
            ).stdout
            return f'"{worker}"' in out

        wait_for("s1 rerouted to w-c", lambda: rerouted("s1", "w-c"))
        # A second replacement on the same policy: the event Recorder patches the repeat.
        cluster.apply([pod("w-d")])
        make_ready(cluster, "w-d")
        cluster.run("-n", "apps", "delete", "pod", "w-b", "--wait=false")
        wait_for("s3 rerouted to w-d", lambda: rerouted("s3", "w-d"))
        time.sleep(3)  # status, events, deletion costs settle
        op.send_signal(signal.SIGTERM)
        op.wait(timeout=30)
        op = None
    finally:
        if op is not None:
            op.kill()
            op.wait()
        if proxy is not None:
            proxy.__exit__(None, None, None)
        emu.terminate()
        emu.wait(timeout=10)
        subprocess.run(
            ["psql", database_url, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], capture_output=True, timeout=60
        )

    requests = {r for r in (parse_request(m, u) for m, u in proxy.requests) if r}
    assert any(r.resource == "sessionpolicies/status" for r in requests), "the scenario did not run"
    rules = rules_in_force(docs)
    used_rules: set[tuple[str, int, str]] = set()
    denied = []
    for request in sorted(requests, key=str):
        allowed = authorizing_rules(request, rules)
        if not allowed:
            denied.append(request)
        used_rules.update(allowed)
    assert not denied, "the chart does not allow requests the operator made:\n" + "\n".join(map(str, denied))
    granted = {
        (role, index, verb): (rule["apiGroups"], rule["resources"], verb)
        for _, role, index, rule in rules
        for verb in rule["verbs"]
    }
    unused = [
        f"{role} rule {index}: {what}"
        for (role, index, verb), what in sorted(granted.items())
        if (role, index, verb) not in used_rules
        and not any((g, r, verb) in SITUATIONAL for g in what[0] for r in what[1])
    ]
    assert not unused, "the chart grants what the operator did not use:\n" + "\n".join(unused)
