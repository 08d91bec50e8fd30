#!/usr/bin/env python3
"""Render the roomcast Helm chart offline and validate it.

How to run (from anywhere; no cluster, no helm binary and no network needed):

    python3 -m pip install helm-python-sdk kubernetes-validate
    #   (add --break-system-packages if pip refuses to install into the system Python)
    python3 charts/check.py                     # Kubernetes schemas of 1.30
    python3 charts/check.py --kube-version 1.33
    python3 charts/check.py --roomcast target/release/roomcast   # also start the node
                                                                  # on each rendered config

For each value set below it runs `helm lint --strict` (helm-python-sdk bundles Helm's Go
SDK), renders the chart (`helm template`: the values schema is applied too), validates
every rendered manifest against the Kubernetes JSON schemas of the chosen version
(kubernetes-validate, strict: unknown fields fail; the ServiceMonitor is a CRD without a
schema there and gets a structural check instead), and checks how the manifests fit
together (selectors, ports, env, probes, grace periods). Value sets that must not render
(the memory broker with several replicas, ...) must fail with the expected message.

With a roomcast binary (--roomcast PATH, or target/release/roomcast or
target/debug/roomcast when present) it also starts the node on each rendered TOML config
and environment, with the memory broker and a loopback port, and checks that it accepts
them (the node validates its whole configuration before binding) and shuts down on
SIGTERM. --no-node skips that.

Exits 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import helm_python as helm
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
    import yaml
except ImportError as e:  # pragma: no cover - guidance only
    sys.exit(
        f"check.py: missing module ({e}); install with:\n"
        "  python3 -m pip install helm-python-sdk kubernetes-validate\n"
        "  (or with --break-system-packages)"
    )

HERE = Path(__file__).resolve().parent
CHART = HERE / "roomcast"
REPO = HERE.parent
RELEASE = "roomcast"
NAMESPACE = "realtime"
CONFIG_PATH = "/etc/roomcast/roomcast.toml"

# Kinds without a schema in kubernetes-validate (CRDs), and their structural check.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

JWT_SECRET = "0123456789abcdef0123456789abcdef-check"  # 38 bytes
API_KEY = "check-api-key-0123456789"


@dataclass
class Case:
    name: str
    values: dict[str, Any]
    # Kinds that must be rendered (exactly this set).
    kinds: set[str] = field(default_factory=set)
    # For a value set that must not render: a fragment of the expected error.
    fails_with: str | None = None
    # Further checks on the rendered objects.
    extra: Callable[[dict[str, list[dict]], "Report"], None] | None = None


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str) -> None:
        self.failed += 1
        print(f"  FAIL  {what}")

    def skip(self, what: str) -> None:
        self.skipped += 1
        print(f"  skip  {what}")

    def check(self, cond: bool, what: str) -> bool:
        (self.ok if cond else self.fail)(what)
        return cond


# ---------------------------------------------------------------------------------------
# Value sets


def full_redis_checks(objs: dict[str, list[dict]], r: Report) -> None:
    dep = objs["Deployment"][0]
    c = container(dep)
    env = env_map(c)
    r.check("replicas" not in dep["spec"], "with the HPA the Deployment leaves replicas to it")
    r.check(env.get("ROOMCAST_TRUSTED_PROXIES", {}).get("value") == "10.0.0.0/8,192.168.0.0/16",
            "trustedProxies joined into ROOMCAST_TRUSTED_PROXIES")
    r.check(env.get("ROOMCAST_MAX_CONNECTIONS", {}).get("value") == "50000", "ROOMCAST_MAX_CONNECTIONS")
    r.check(env.get("ROOMCAST_ALLOW_ANONYMOUS", {}).get("value") == "true", "ROOMCAST_ALLOW_ANONYMOUS")
    r.check(env.get("ROOMCAST_PING_MS", {}).get("value") == "20000", "extraEnv passed through")
    ing = objs["Ingress"][0]
    ann = ing["metadata"].get("annotations", {})
    r.check(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout") == "3600",
            "ingress carries the WebSocket timeout annotations")
    r.check(ing["spec"].get("ingressClassName") == "nginx", "ingressClassName")
    r.check(ing["spec"]["tls"][0]["secretName"] == "roomcast-tls", "ingress TLS")
    hpa = objs["HorizontalPodAutoscaler"][0]
    r.check(hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 12, "HPA bounds")
    pdb = objs["PodDisruptionBudget"][0]
    r.check(pdb["spec"].get("minAvailable") == 2 and "maxUnavailable" not in pdb["spec"],
            "PDB minAvailable replaces maxUnavailable")
    sm = objs["ServiceMonitor"][0]
    r.check(sm["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor extra labels")


def memory_single_checks(objs: dict[str, list[dict]], r: Report) -> None:
    dep = objs["Deployment"][0]
    r.check(dep["spec"].get("replicas") == 1, "memory broker: 1 replica")
    r.check(dep["spec"]["strategy"]["type"] == "Recreate",
            "memory broker: Recreate strategy (never two single-node brokers at once)")
    r.check(env_map(container(dep))["ROOMCAST_BROKER"].get("value") == "memory", "ROOMCAST_BROKER=memory")


def defaults_checks(objs: dict[str, list[dict]], r: Report) -> None:
    dep = objs["Deployment"][0]
    r.check(dep["spec"].get("replicas") == 3, "default replicaCount 3")
    r.check(dep["spec"]["strategy"]["type"] == "RollingUpdate"
            and dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0},
            "rolling update one pod at a time")
    c = container(dep)
    env = env_map(c)
    r.check(not any(k in env for k in ("ROOMCAST_JWT_HMAC_SECRET", "ROOMCAST_API_KEY", "ROOMCAST_PRESENCE")),
            "no secret or presence variables unless configured")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    r.check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics"
            and ann.get("prometheus.io/port") == "8000", "prometheus.io scrape annotations")
    tsc = dep["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    r.check(any(t.get("topologyKey") == "kubernetes.io/hostname" for t in tsc),
            "topologySpreadConstraints across nodes")
    svc = objs["Service"][0]
    r.check(svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 8000
            and svc["spec"]["ports"][0]["name"] == "http", "Service ClusterIP, port 8000 named http")


def nats_checks(objs: dict[str, list[dict]], r: Report) -> None:
    dep = objs["Deployment"][0]
    c = container(dep)
    env = env_map(c)
    r.check(env["ROOMCAST_BROKER"].get("value") == "nats://nats:4222", "ROOMCAST_BROKER nats")
    r.check(env.get("ROOMCAST_PRESENCE", {}).get("value") == "nats://nats-presence:4222", "ROOMCAST_PRESENCE")
    r.check(env.get("ROOMCAST_API_NATS_URL", {}).get("value") == "off", "ROOMCAST_API_NATS_URL")
    for var, key in (("ROOMCAST_JWT_HMAC_SECRET", "jwt"), ("ROOMCAST_API_KEY", "http-api-key")):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        r.check(ref.get("name") == "roomcast-secrets" and ref.get("key") == key and ref.get("optional") is True,
                f"{var} from the existing Secret (optional key {key})")
    r.check("ROOMCAST_CONFIG" not in env and "lifecycle" not in c, "no config file, no preStop hook")


CASES: list[Case] = [
    Case(
        "defaults",
        {},
        kinds={"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"},
        extra=defaults_checks,
    ),
    Case(
        "redis, 3 replicas, ingress + HPA + PDB + ServiceMonitor + inline secrets",
        {
            "broker": "redis://redis-master.data.svc:6379",
            "replicaCount": 3,
            "trustedProxies": ["10.0.0.0/8", "192.168.0.0/16"],
            "maxConnections": 50000,
            "allowAnonymous": True,
            "extraEnv": [{"name": "ROOMCAST_PING_MS", "value": "20000"}],
            "secrets": {"jwtHmacSecret": JWT_SECRET, "apiKey": API_KEY},
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [
                    {"host": "rt.example.com", "paths": [{"path": "/ws", "pathType": "Prefix"},
                                                         {"path": "/api", "pathType": "Prefix"}]}
                ],
                "tls": [{"secretName": "roomcast-tls", "hosts": ["rt.example.com"]}],
            },
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                            "targetMemoryUtilizationPercentage": 80},
            "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        },
        kinds={"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
               "HorizontalPodAutoscaler", "Ingress", "ServiceMonitor"},
        extra=full_redis_checks,
    ),
    Case(
        "memory broker, 1 replica",
        {"broker": "memory", "replicaCount": 1},
        kinds={"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"},
        extra=memory_single_checks,
    ),
    Case(
        "nats broker, existing Secret, no config file, no preStop",
        {
            "broker": "nats://nats:4222",
            "presence": "nats://nats-presence:4222",
            "apiNatsUrl": "off",
            "secrets": {"existingSecret": "roomcast-secrets", "jwtHmacSecretKey": "jwt",
                        "apiKeyKey": "http-api-key"},
            "config": "",
            "lifecycle": {"preStopSleepSeconds": 0},
            "podDisruptionBudget": {"enabled": False},
        },
        kinds={"Deployment", "Service"},
        extra=nats_checks,
    ),
    Case(
        "memory broker, 3 replicas (must fail)",
        {"broker": "memory", "replicaCount": 3},
        fails_with='broker "memory" keeps rooms, history and presence inside one process: replicaCount must be 1 (got 3)',
    ),
    Case(
        "memory broker with autoscaling (must fail)",
        {"broker": "memory", "replicaCount": 1, "autoscaling": {"enabled": True}},
        fails_with="autoscaling.enabled must be false",
    ),
    Case(
        "memory presence, 3 replicas (must fail)",
        {"broker": "redis://redis:6379", "presence": "memory"},
        fails_with='presence "memory" is not shared between nodes',
    ),
    Case(
        "termination grace shorter than preStop + shutdown grace (must fail)",
        {"terminationGracePeriodSeconds": 12},
        fails_with="terminationGracePeriodSeconds (12) must be at least",
    ),
    Case(
        "short inline JWT secret (must fail)",
        {"secrets": {"jwtHmacSecret": "too-short"}},
        fails_with="secrets.jwtHmacSecret must be at least 32 bytes",
    ),
    Case(
        "unknown broker scheme (must fail the values schema)",
        {"broker": "mysql://db:3306"},
        fails_with="/broker",
    ),
]


# ---------------------------------------------------------------------------------------
# Helpers


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_map(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def subset(small: dict, big: dict) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def render(values: dict) -> tuple[dict[str, str], str]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    notes = ""
    for path in list(out):
        if path.endswith("NOTES.txt"):
            notes = out.pop(path)
    return out, notes


def parse(manifests: dict[str, str], r: Report) -> dict[str, list[dict]] | None:
    objs: dict[str, list[dict]] = {}
    for path, text in sorted(manifests.items()):
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as e:
            r.fail(f"{path}: not YAML: {e}")
            return None
        for d in docs:
            objs.setdefault(d.get("kind", "?"), []).append(d)
    return objs


def validate_schemas(objs: dict[str, list[dict]], kube: str, r: Report) -> None:
    for kind, docs in sorted(objs.items()):
        for d in docs:
            name = f"{kind}/{d.get('metadata', {}).get('name', '?')}"
            if (d.get("apiVersion"), kind) in CRD_KINDS:
                check_servicemonitor(d, objs, r)
                continue
            try:
                v = kubernetes_validate.validate(d, kube, strict=True)
                r.ok(f"{name} valid against Kubernetes {v} (strict)")
            except kv_utils.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                r.fail(f"{name} invalid against Kubernetes {e.version}: {path}: {e.message}")
            except kv_utils.SchemaNotFoundError as e:
                r.fail(f"{name}: no schema ({e.message})")


def check_servicemonitor(sm: dict, objs: dict[str, list[dict]], r: Report) -> None:
    spec = sm.get("spec", {})
    svc = objs.get("Service", [{}])[0]
    port_names = {p.get("name") for p in svc.get("spec", {}).get("ports", [])}
    eps = spec.get("endpoints", [])
    r.check(
        subset(spec.get("selector", {}).get("matchLabels", {}), svc.get("metadata", {}).get("labels", {}))
        and bool(eps) and all(e.get("port") in port_names and e.get("path") == "/metrics" for e in eps)
        and spec.get("namespaceSelector", {}).get("matchNames") == [NAMESPACE],
        "ServiceMonitor (CRD, no schema): selects the Service, scrapes port http at /metrics",
    )


def check_common(objs: dict[str, list[dict]], values: dict, r: Report) -> None:
    dep = objs["Deployment"][0]
    spec = dep["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"]["labels"]
    c = container(dep)
    env = env_map(c)
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)

    r.check(subset(spec["selector"]["matchLabels"], pod_labels), "Deployment selector matches its pod labels")
    svc = objs["Service"][0]
    r.check(subset(svc["spec"]["selector"], pod_labels), "Service selector matches the pods")
    port = c["ports"][0]
    r.check(port["name"] == "http" and svc["spec"]["ports"][0]["targetPort"] == "http",
            "Service targets the container port named http")
    r.check(env.get("ROOMCAST_LISTEN", {}).get("value") == f"0.0.0.0:{port['containerPort']}",
            "ROOMCAST_LISTEN is 0.0.0.0:<containerPort>")
    node_id = env.get("ROOMCAST_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
    r.check(node_id.get("fieldPath") == "metadata.name", "ROOMCAST_NODE_ID from the pod name (fieldRef)")
    r.check(env.get("ROOMCAST_BROKER", {}).get("value") == merged["broker"].strip(), "ROOMCAST_BROKER from values")

    def probe_path(p: str) -> str | None:
        return c.get(p, {}).get("httpGet", {}).get("path")

    r.check(probe_path("readinessProbe") == "/readyz" and probe_path("livenessProbe") == "/healthz"
            and probe_path("startupProbe") == "/healthz",
            "probes: readiness /readyz, liveness and startup /healthz")
    for p in ("readinessProbe", "livenessProbe", "startupProbe"):
        if c.get(p, {}).get("httpGet", {}).get("port") not in ("http", port["containerPort"]):
            r.fail(f"{p} does not probe the http port")

    # Shutdown: preStop sleep + the node's grace must fit in the pod's grace period.
    grace_ms = int(env.get("ROOMCAST_SHUTDOWN_GRACE_MS", {}).get("value", "10000"))
    cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0
    tgps = pod["spec"]["terminationGracePeriodSeconds"]
    r.check(tgps * 1000 > pre_stop * 1000 + grace_ms,
            f"terminationGracePeriodSeconds {tgps} s > preStop {pre_stop} s + shutdown grace {grace_ms} ms")

    psc = pod["spec"].get("securityContext", {})
    csc = c.get("securityContext", {})
    r.check(psc.get("runAsNonRoot") is True and csc.get("readOnlyRootFilesystem") is True
            and csc.get("allowPrivilegeEscalation") is False,
            "non-root, read-only root filesystem, no privilege escalation")

    # The config file: ConfigMap -> volume -> mount -> ROOMCAST_CONFIG, and valid TOML.
    cms = objs.get("ConfigMap", [])
    if cms:
        cm = cms[0]
        vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        mount = mounts.get(os.path.dirname(CONFIG_PATH))
        vol = vols.get(mount["name"]) if mount else None
        r.check(env.get("ROOMCAST_CONFIG", {}).get("value") == CONFIG_PATH and vol is not None
                and vol.get("configMap", {}).get("name") == cm["metadata"]["name"]
                and os.path.basename(CONFIG_PATH) in cm["data"],
                f"ConfigMap mounted at {CONFIG_PATH}, named by ROOMCAST_CONFIG")
        try:
            tomllib.loads(cm["data"]["roomcast.toml"])
            r.ok("roomcast.toml is valid TOML")
        except tomllib.TOMLDecodeError as e:
            r.fail(f"roomcast.toml is not valid TOML: {e}")
        ann = pod["metadata"].get("annotations", {})
        r.check("checksum/config" in ann, "pods roll when the config changes (checksum/config)")
    else:
        r.check("ROOMCAST_CONFIG" not in env, "no ConfigMap: no ROOMCAST_CONFIG")

    # Secrets referenced by the env must exist (when the chart creates them) with the key.
    secrets = {s["metadata"]["name"]: s for s in objs.get("Secret", [])}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            s = secrets.get(ref["name"])
            r.check(s is not None and ref["key"] in s.get("data", {}),
                    f"{e['name']} refers to key {ref['key']} of the rendered Secret {ref['name']}")
        if "value" in e and e["name"] in ("ROOMCAST_JWT_HMAC_SECRET", "ROOMCAST_API_KEY"):
            r.fail(f"{e['name']} is a plain value in the Deployment")

    for pdb in objs.get("PodDisruptionBudget", []):
        r.check(subset(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selects the pods")
    for tsc in pod["spec"].get("topologySpreadConstraints", []):
        sel = tsc.get("labelSelector", {}).get("matchLabels", {})
        if sel:
            r.check(subset(sel, pod_labels), f"topology spread over {tsc['topologyKey']} selects the pods")
    for hpa in objs.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        r.check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"],
                "HPA scales the Deployment")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ing in objs.get("Ingress", []):
        backends = [p["backend"]["service"] for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]]
        r.check(bool(backends) and all(b["name"] == svc["metadata"]["name"] and b["port"].get("name") in svc_ports
                                       for b in backends), "Ingress routes to the Service's http port")
    for kind, docs in objs.items():
        for d in docs:
            name = d["metadata"]["name"]
            if len(name) > 63:
                r.fail(f"{kind}/{name}: name longer than 63 characters")


def node_env(objs: dict[str, list[dict]]) -> dict[str, str]:
    """The node's environment from the rendered Deployment, for a local run."""
    c = container(objs["Deployment"][0])
    secrets = {s["metadata"]["name"]: s for s in objs.get("Secret", [])}
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] in secrets and ref["key"] in secrets[ref["name"]].get("data", {}):
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    # Locally: a loopback port, the memory broker, no NATS API, a fixed node id.
    env.update({
        "ROOMCAST_LISTEN": "127.0.0.1:0",
        "ROOMCAST_NODE_ID": "roomcast-check-0",
        "ROOMCAST_BROKER": "memory",
        "ROOMCAST_API_NATS_URL": "off",
    })
    env.pop("ROOMCAST_PRESENCE", None)
    return env


def run_node(binary: Path, objs: dict[str, list[dict]], r: Report) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env.update(node_env(objs))
    with tempfile.TemporaryDirectory(prefix="roomcast-check-") as tmp:
        if "ROOMCAST_CONFIG" in env:
            cm = objs["ConfigMap"][0]
            path = Path(tmp) / "roomcast.toml"
            path.write_text(cm["data"]["roomcast.toml"])
            env["ROOMCAST_CONFIG"] = str(path)
        proc = subprocess.Popen([str(binary), "serve"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = ""
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                if ready:
                    line = proc.stdout.readline()
                    if line.startswith("roomcast listening on "):
                        break
            listening = line.startswith("roomcast listening on ")
            if not listening:
                proc.kill()
                _, err = proc.communicate(timeout=10)
                r.fail(f"node refused the rendered configuration: {err.strip()[-500:]}")
                return
            # The routes a deployment uses (probes, scraping). The node handles SIGTERM
            # from before it prints the listening line.
            base = "http://" + line.split("ws://", 1)[1].split("/", 1)[0]
            got = {path: http_get(base + path) for path in ("/healthz", "/readyz", "/metrics")}
            r.check(got["/healthz"][0] == 200 and got["/readyz"][0] == 200
                    and "roomcast_ready 1" in got["/metrics"][1],
                    "node answers /healthz 200, /readyz 200, /metrics with roomcast_ready 1: "
                    + ", ".join(f"{p} {c}" for p, (c, _) in got.items()))
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            r.check(code == 0, f"node started on the rendered config and env ({line.strip()}), "
                               f"exited {code} on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


def find_binary(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    for p in (REPO / "target/release/roomcast", REPO / "target/debug/roomcast"):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kube-version", default="1.30", help="Kubernetes schema version (default 1.30)")
    ap.add_argument("--roomcast", help="roomcast binary to start on each rendered config")
    ap.add_argument("--no-node", action="store_true", help="do not start the node")
    args = ap.parse_args()
    kube = args.kube_version.lstrip("v")
    binary = None if args.no_node else find_binary(args.roomcast)
    if binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
        print(f"check.py: {binary} is not an executable file", file=sys.stderr)
        return 2

    print(f"chart {CHART} | helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}) | "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {kube} schemas | "
          f"node: {binary or 'not started (no binary; build it or pass --roomcast)'}")
    r = Report()
    for case in CASES:
        print(f"\n== {case.name}")
        if case.fails_with is not None:
            try:
                render(case.values)
                r.fail(f"rendered, but must fail with: {case.fails_with}")
            except helm.HelmError as e:
                msg = str(e)
                r.check(case.fails_with in msg, f"render refused: {msg.strip().splitlines()[-1].strip()}")
            continue

        lint = helm.lint(CHART, case.values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube}.0")
        problems = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + [
            {"path": "", "error": e} for e in lint.get("errors", [])]
        r.check(not problems, "helm lint --strict" + (
            "" if not problems else ": " + "; ".join(f"{p.get('path')}: {p.get('error')}" for p in problems)))
        try:
            manifests, notes = render(case.values)
        except helm.HelmError as e:
            r.fail(f"helm template failed: {e}")
            continue
        objs = parse(manifests, r)
        if objs is None:
            continue
        r.check(set(objs) == case.kinds,
                f"renders {', '.join(sorted(objs))}" + ("" if set(objs) == case.kinds
                                                        else f" (expected {', '.join(sorted(case.kinds))})"))
        r.check(bool(notes.strip()), "NOTES.txt renders")
        if "Deployment" not in objs or "Service" not in objs:
            continue
        validate_schemas(objs, kube, r)
        check_common(objs, case.values, r)
        if case.extra:
            case.extra(objs, r)
        if binary is not None:
            run_node(binary, objs, r)

    print(f"\ncheck.py: {r.passed} passed, {r.failed} failed" + (f", {r.skipped} skipped" if r.skipped else ""))
    return 0 if r.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
