#!/usr/bin/env python3
"""Offline checks of the deployment files: no Docker engine or cluster needed.

- docker-compose.yml passes `docker-compose config`, and its workers' settings
  file, ports and health checks agree with what the `sluice` binary accepts.
- Every kustomization under deploy/k8s renders (`kubectl kustomize`, or
  `kustomize build`), every built-in object validates against the Kubernetes
  schemas shipped by the kubernetes-validate package, and KEDA and
  Prometheus Operator objects have the fields their controllers need.
- The rendered ConfigMap's settings file passes `sluice config check` with
  the Deployment's environment (secrets stubbed), and ports, probes, the
  grace period, selectors, autoscaler bounds and Job arguments match the
  binary and the settings.

Usage: deploy/check.py [--sluice target/debug/sluice]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml
import kubernetes_validate

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
RENDERINGS = ["base", "overlays/example", "overlays/example-hpa", "overlays/example-jobs"]
KUBERNETES_VERSION = "1.32.0"
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}

results = []


def check(name, ok, detail=""):
    results.append((name, ok))
    mark = "ok  " if ok else "FAIL"
    print(f"{mark} {name}" + (f": {detail}" if detail and not ok else ""))
    return ok


def run(command, env=None, cwd=ROOT):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def render(directory):
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(K8S / directory)]
    else:
        command = ["kustomize", "build", str(K8S / directory)]
    done = run(command)
    if done.returncode != 0:
        return None, done.stderr.strip()
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc], ""


def config_check(sluice, toml_text, env_names):
    """Runs `sluice config check` on the settings with the given SLUICE_
    variables set to stand-in values, as a pod would see them."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sluice.toml"
        path.write_text(toml_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        for name in env_names:
            env[name] = "stand-in-secret"
        done = run([sluice, "config", "check", "--config", str(path)], env=env)
        return done.returncode == 0, (done.stdout + done.stderr).strip()


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def check_compose(sluice):
    if not shutil.which("docker-compose"):
        check("compose: docker-compose is installed", False, "apt-get install docker-compose")
        return
    done = run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"])
    check("compose: docker-compose config", done.returncode == 0, done.stderr.strip())

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    settings_path = ROOT / "deploy" / "compose" / "sluice.toml"
    settings = tomllib.loads(settings_path.read_text())
    ok, output = config_check(sluice, settings_path.read_text(), [])
    check("compose: worker settings pass sluice config check", ok, output)

    listen_port = port_of(settings["server"]["listen"])
    for name in ["worker-1", "worker-2"]:
        service = services[name]
        ports = [str(p) for p in service.get("ports", [])]
        check(f"compose: {name} publishes the metrics port {listen_port}",
              any(p.endswith(f":{listen_port}") for p in ports), str(ports))
        test = " ".join(service["healthcheck"]["test"])
        check(f"compose: {name} health check probes /readyz on {listen_port}",
              f":{listen_port}/readyz" in test, test)
        depends = service["depends_on"]
        check(f"compose: {name} starts after the topics job succeeded",
              depends.get("topics", {}).get("condition") == "service_completed_successfully", str(depends))
        check(f"compose: {name} stop grace exceeds the drain deadline",
              int(service["stop_grace_period"].rstrip("s")) > settings["worker"]["drain_deadline_ms"] / 1000)
    brokers = settings["kafka"]["brokers"]
    check("compose: settings point at the kafka service", brokers.split(":")[0] in services, brokers)
    check("compose: demo receiver and producer sit behind the demo profile",
          all("demo" in services[s].get("profiles", []) for s in ["receiver", "producer"]))
    receiver_url = settings["handler"]["url"]
    check("compose: handler url targets the receiver service", "//receiver:8080/" in receiver_url, receiver_url)


def validate_builtin(doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return True, ""
    except Exception as error:  # the package raises several error types
        return False, str(error).splitlines()[0]


def check_crd(doc, where):
    kind = doc["kind"]
    spec = doc.get("spec", {})
    if kind == "ScaledObject":
        check(f"{where}: ScaledObject has keda.sh/v1alpha1", doc["apiVersion"] == "keda.sh/v1alpha1")
        check(f"{where}: ScaledObject targets a Deployment by name", bool(spec.get("scaleTargetRef", {}).get("name")))
        triggers = spec.get("triggers", [])
        check(f"{where}: ScaledObject has a kafka trigger with its required metadata",
              any(t.get("type") == "kafka" and {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(t.get("metadata", {}))
                  for t in triggers))
        check(f"{where}: ScaledObject trigger metadata values are strings",
              all(isinstance(v, str) for t in triggers for v in t.get("metadata", {}).values()))
    elif kind == "ServiceMonitor":
        check(f"{where}: ServiceMonitor has monitoring.coreos.com/v1", doc["apiVersion"] == "monitoring.coreos.com/v1")
        endpoints = spec.get("endpoints", [])
        check(f"{where}: ServiceMonitor scrapes /metrics by port name",
              any(e.get("port") and e.get("path") == "/metrics" for e in endpoints))


def check_rendering(directory, sluice):
    docs, error = render(directory)
    if not check(f"{directory}: renders", docs is not None, error):
        return
    for doc in docs:
        where = f"{directory}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            check_crd(doc, where)
        else:
            ok, detail = validate_builtin(doc)
            check(f"{where} validates against Kubernetes {KUBERNETES_VERSION}", ok, detail)

    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config_maps = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"].startswith("sluice-config")]
    if not check(f"{directory}: one sluice-config ConfigMap", len(config_maps) == 1):
        return
    config_map = config_maps[0]
    settings_text = config_map["data"]["sluice.toml"]
    settings = tomllib.loads(settings_text)

    for deployment in by_kind.get("Deployment", []):
        check_workload(directory, deployment, config_map, settings, settings_text, sluice, by_kind)
    for job in by_kind.get("Job", []):
        check_job(directory, job, config_map, settings, settings_text, sluice)

    partitions = settings["topic"]["partitions"]
    for scaled in by_kind.get("ScaledObject", []):
        spec = scaled["spec"]
        check(f"{directory}: KEDA max replicas ({spec['maxReplicaCount']}) within the partitions ({partitions})",
              spec["maxReplicaCount"] <= partitions)
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            check(f"{directory}: KEDA watches the worker group", metadata["consumerGroup"] == settings["worker"]["group_id"],
                  metadata["consumerGroup"])
            check(f"{directory}: KEDA watches the main topic", metadata["topic"] == settings["topic"]["name"], metadata["topic"])
        check(f"{directory}: KEDA targets the worker Deployment",
              spec["scaleTargetRef"]["name"] in [d["metadata"]["name"] for d in by_kind.get("Deployment", [])])
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        spec = hpa["spec"]
        check(f"{directory}: HPA max replicas ({spec['maxReplicas']}) within the partitions ({partitions})",
              spec["maxReplicas"] <= partitions)


def env_names(container):
    return [e["name"] for e in container.get("env", []) if e["name"].startswith("SLUICE_") and e["name"] != "SLUICE_CONFIG"]


def check_mount(where, spec, container, config_map):
    config_path = next((e["value"] for e in container.get("env", []) if e["name"] == "SLUICE_CONFIG"), None)
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in spec.get("volumes", [])}
    mounted = any(volumes.get(name) == config_map["metadata"]["name"] and config_path == f"{path}/sluice.toml"
                  for name, path in mounts.items())
    check(f"{where}: SLUICE_CONFIG points at the mounted ConfigMap file", mounted, f"{config_path} {mounts} {volumes}")


def check_workload(directory, deployment, config_map, settings, settings_text, sluice, by_kind):
    where = f"{directory}: Deployment/{deployment['metadata']['name']}"
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    check_mount(where, spec, container, config_map)

    ok, output = config_check(sluice, settings_text, env_names(container))
    check(f"{where}: settings pass sluice config check with the pod's SLUICE_ variables", ok, output)
    secret_envs = [e for e in container.get("env", []) if "valueFrom" in e]
    check(f"{where}: secrets come from Secret references",
          all("secretKeyRef" in e["valueFrom"] for e in secret_envs) and len(secret_envs) >= 4)

    port = port_of(settings.get("server", {}).get("listen", "0.0.0.0:9464"))
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(f"{where}: metrics port matches server.listen ({port})", ports.get("metrics") == port, str(ports))
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        http = container.get(probe, {}).get("httpGet", {})
        check(f"{where}: {probe} gets {path} on the metrics port", http.get("path") == path and http.get("port") in ("metrics", port), str(http))
    drain_s = settings["worker"].get("drain_deadline_ms", 25000) / 1000
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(f"{where}: grace period ({grace} s) exceeds the drain deadline ({drain_s} s)", grace > drain_s + 5)
    resources = container.get("resources", {})
    check(f"{where}: requests and limits are set", {"requests", "limits"} <= set(resources))
    check(f"{where}: runs as non-root", spec.get("securityContext", {}).get("runAsNonRoot") is True)

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ["Service", "PodDisruptionBudget"]:
        for doc in by_kind.get(kind, []):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            check(f"{directory}: {kind}/{doc['metadata']['name']} selects the worker pods",
                  all(labels.get(k) == v for k, v in selector.items()), str(selector))
    for monitor in by_kind.get("ServiceMonitor", []):
        services = by_kind.get("Service", [])
        names = [p["name"] for s in services for p in s["spec"]["ports"]]
        check(f"{directory}: ServiceMonitor port is a Service port name",
              all(e["port"] in names for e in monitor["spec"]["endpoints"]), str(names))
    replicas = deployment["spec"].get("replicas", 1)
    check(f"{where}: replicas ({replicas}) within the partitions", replicas <= settings["topic"]["partitions"])


def check_job(directory, job, config_map, settings, settings_text, sluice):
    where = f"{directory}: Job/{job['metadata']['name']}"
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    check_mount(where, spec, container, config_map)
    args = container["args"]
    words = [a for a in args[:2] if not a.startswith("-")]
    done = run([sluice, *words, "--help"])
    check(f"{where}: `sluice {' '.join(words)}` exists", done.returncode == 0, done.stderr.strip())
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    unknown = [f for f in flags if f not in done.stdout]
    check(f"{where}: every flag is one the binary accepts", not unknown, str(unknown))
    if "--topic" in args:
        topic = args[args.index("--topic") + 1]
        check(f"{where}: --topic is the settings' main topic", topic == settings["topic"]["name"], topic)
    ok, output = config_check(sluice, settings_text, env_names(container))
    check(f"{where}: settings pass sluice config check", ok, output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sluice", default=str(ROOT / "target" / "debug" / "sluice"))
    args = parser.parse_args()
    if not Path(args.sluice).exists():
        print(f"error: {args.sluice} not found; build it with `cargo build --bins`", file=sys.stderr)
        return 2
    check_compose(args.sluice)
    for directory in RENDERINGS:
        check_rendering(directory, args.sluice)
    failed = sum(1 for _, ok in results if not ok)
    print(f"deploy check: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
