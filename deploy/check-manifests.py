#!/usr/bin/env python3
"""Static checks of the Kubernetes manifests under deploy/kubernetes/.

Usage: python3 deploy/check-manifests.py [DIR_OR_FILE...]
       (default: the kubernetes/ folder beside this script)

Parses every *.yaml / *.yml document (PyYAML: Debian's python3-yaml, or
`pip install pyyaml`) and checks, without a cluster:

  every object      apiVersion, kind, metadata.name (a DNS-1123 name)
  Kustomization     the resources it lists exist
  workloads         selector.matchLabels match the pod template's labels;
  (DaemonSet, ...)  containers have a name and an image; container ports are
                    1..65535, TCP/UDP/SCTP, named uniquely (<= 15 chars);
                    probes use a port the container declares; requests and
                    limits set; runAsNonRoot, readOnlyRootFilesystem, no
                    privilege escalation, all capabilities dropped
  Service           its selector picks a workload's pods; every port's
                    targetPort (name or number) is a port of those pods with
                    the same protocol; valid type and internalTrafficPolicy

Prints one PASS/FAIL line per check and "check-manifests: N passed, N failed";
exits 1 if any check failed, 2 on a usage or parse error.
"""

import os
import re
import sys

try:
    import yaml
except ImportError:
    # pyenv's or a venv's python3 may lack PyYAML where Debian's has it
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") \
            and os.access("/usr/bin/python3", os.X_OK) \
            and not os.environ.get("CHECK_MANIFESTS_REEXEC"):
        os.environ["CHECK_MANIFESTS_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    sys.stderr.write("error: PyYAML is missing: apt-get install python3-yaml "
                     "(or pip install pyyaml)\n")
    sys.exit(2)

WORKLOAD_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PROTOCOLS = {"TCP", "UDP", "SCTP"}


class Checker:
    def __init__(self):
        self.passes = 0
        self.fails = []

    def check(self, ok, name, why=""):
        if ok:
            self.passes += 1
            print(f"PASS  {name}")
        else:
            self.fails.append(name)
            print(f"FAIL  {name}" + (f"  ({why})" if why else ""))
        return ok


def load(paths):
    """[(file, index, doc)] for every non-empty document."""
    docs = []
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names if n.endswith((".yaml", ".yml"))]
        else:
            files.append(p)
    if not files:
        sys.stderr.write(f"error: no YAML files in {' '.join(paths)}\n")
        sys.exit(2)
    for f in sorted(files):
        try:
            with open(f, encoding="utf-8") as fh:
                for i, doc in enumerate(yaml.safe_load_all(fh)):
                    if doc is not None:
                        docs.append((f, i, doc))
        except (OSError, yaml.YAMLError) as e:
            sys.stderr.write(f"error: {f}: {e}\n")
            sys.exit(2)
    return docs


def port_lookup(containers):
    """{name -> (number, protocol)}, {(number, protocol)} of all containers."""
    by_name, by_num = {}, set()
    for c in containers:
        for p in c.get("ports") or []:
            proto = p.get("protocol", "TCP")
            if "name" in p:
                by_name[p["name"]] = (p.get("containerPort"), proto)
            by_num.add((p.get("containerPort"), proto))
    return by_name, by_num


def check_probe_port(ck, where, probe_name, probe, container):
    handler = None
    for h in ("httpGet", "tcpSocket", "grpc"):
        if h in probe:
            handler = h
    if handler is None:
        ck.check("exec" in probe, f"{where}: {probe_name} has a handler",
                 "none of httpGet/tcpSocket/grpc/exec")
        return
    port = probe[handler].get("port")
    by_name, by_num = port_lookup([container])
    if isinstance(port, str) and not port.isdigit():
        ok = port in by_name and by_name[port][1] == "TCP"
        ck.check(ok, f"{where}: {probe_name} {handler} port '{port}' is a declared TCP port",
                 f"declared: {sorted(by_name)}")
    else:
        ok = (int(port), "TCP") in by_num if port is not None else False
        ck.check(ok, f"{where}: {probe_name} {handler} port {port} is a declared TCP port",
                 f"declared: {sorted(by_num)}")
    if handler == "httpGet":
        path = probe[handler].get("path", "")
        ck.check(str(path).startswith("/"), f"{where}: {probe_name} httpGet path '{path}' is absolute")


def check_workload(ck, f, doc):
    kind, name = doc["kind"], doc["metadata"]["name"]
    where = f"{kind}/{name}"
    spec = doc.get("spec") or {}
    tmpl = spec.get("template") or {}
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    ck.check(bool(match), f"{where}: spec.selector.matchLabels is set")
    ck.check(all(labels.get(k) == v for k, v in match.items()),
             f"{where}: selector matches the pod template labels",
             f"selector {match}, labels {labels}")
    pod = tmpl.get("spec") or {}
    containers = pod.get("containers") or []
    if not ck.check(bool(containers), f"{where}: has containers"):
        return None
    psc = pod.get("securityContext") or {}
    for c in containers:
        cw = f"{where} container {c.get('name', '?')}"
        ck.check(bool(c.get("name")) and bool(c.get("image")), f"{cw}: has a name and an image")
        ports = c.get("ports") or []
        names = [p.get("name") for p in ports if p.get("name")]
        ck.check(len(names) == len(set(names)), f"{cw}: port names are unique", str(names))
        for p in ports:
            num, proto, pname = p.get("containerPort"), p.get("protocol", "TCP"), p.get("name")
            ok = isinstance(num, int) and 1 <= num <= 65535 and proto in PROTOCOLS \
                and (pname is None or bool(IANA_SVC_NAME.match(pname)))
            ck.check(ok, f"{cw}: port {pname or '-'} {num}/{proto} is valid")
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe_name in c:
                check_probe_port(ck, cw, probe_name, c[probe_name], c)
        ck.check("readinessProbe" in c and "livenessProbe" in c,
                 f"{cw}: has readiness and liveness probes")
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        ck.check("cpu" in req and "memory" in req and "memory" in lim,
                 f"{cw}: cpu+memory requests and a memory limit", str(res))
        sc = c.get("securityContext") or {}
        ck.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True,
                 f"{cw}: runAsNonRoot")
        ck.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        ck.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
        ck.check(sc.get("privileged", False) is False, f"{cw}: not privileged")
        drop = ((sc.get("capabilities") or {}).get("drop")) or []
        add = ((sc.get("capabilities") or {}).get("add")) or []
        ck.check("ALL" in drop and not add, f"{cw}: drops ALL capabilities, adds none",
                 f"drop {drop}, add {add}")
    return labels, containers


def check_service(ck, doc, workloads):
    name = doc["metadata"]["name"]
    where = f"Service/{name}"
    spec = doc.get("spec") or {}
    ck.check(spec.get("type", "ClusterIP") in {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
             f"{where}: valid type '{spec.get('type', 'ClusterIP')}'")
    if "internalTrafficPolicy" in spec:
        ck.check(spec["internalTrafficPolicy"] in {"Cluster", "Local"},
                 f"{where}: valid internalTrafficPolicy '{spec['internalTrafficPolicy']}'")
    sel = spec.get("selector") or {}
    if not ck.check(bool(sel), f"{where}: has a selector"):
        return
    targets = [(wn, containers) for wn, (labels, containers) in workloads.items()
               if all(labels.get(k) == v for k, v in sel.items())]
    if not ck.check(bool(targets), f"{where}: selector {sel} picks a workload's pods",
                    f"workloads: {sorted(workloads)}"):
        return
    ports = spec.get("ports") or []
    ck.check(bool(ports), f"{where}: has ports")
    if len(ports) > 1:
        names = [p.get("name") for p in ports]
        ck.check(all(names) and len(set(names)) == len(names),
                 f"{where}: several ports, each named uniquely", str(names))
    for p in ports:
        proto = p.get("protocol", "TCP")
        port = p.get("port")
        tp = p.get("targetPort", port)
        ck.check(isinstance(port, int) and 1 <= port <= 65535 and proto in PROTOCOLS,
                 f"{where}: port {p.get('name', '-')} {port}/{proto} is valid")
        for wn, containers in targets:
            by_name, by_num = port_lookup(containers)
            if isinstance(tp, str) and not tp.isdigit():
                ok = tp in by_name and by_name[tp][1] == proto
                shown = f"'{tp}'" + (f" = {by_name[tp][0]}/{by_name[tp][1]}" if tp in by_name else "")
            else:
                ok = (int(tp), proto) in by_num
                shown = f"{tp}/{proto}"
            ck.check(ok, f"{where}: {port}/{proto} -> targetPort {shown} exists in {wn}",
                     f"pod ports: {sorted(by_num)}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sys.argv[1:] or [os.path.join(here, "kubernetes")]
    docs = load(paths)
    ck = Checker()
    workloads = {}
    services = []
    for f, i, doc in docs:
        rel = os.path.relpath(f)
        where = f"{rel}#{i}"
        if not ck.check(isinstance(doc, dict), f"{where}: is a mapping"):
            continue
        kind = doc.get("kind")
        ok = bool(doc.get("apiVersion")) and bool(kind)
        ck.check(ok, f"{where}: has apiVersion and kind")
        if kind == "Kustomization":
            base = os.path.dirname(f)
            for r in doc.get("resources") or []:
                ck.check(os.path.exists(os.path.join(base, r)), f"{where}: resource {r} exists")
            continue
        name = (doc.get("metadata") or {}).get("name")
        if not ck.check(isinstance(name, str) and bool(DNS1123_SUBDOMAIN.match(name)) and len(name) <= 253,
                        f"{where}: {kind} metadata.name '{name}' is valid"):
            continue
        if kind in WORKLOAD_KINDS:
            r = check_workload(ck, f, doc)
            if r:
                workloads[f"{kind}/{name}"] = r
        elif kind == "Service":
            services.append(doc)
    for doc in services:
        check_service(ck, doc, workloads)
    print()
    print(f"check-manifests: {ck.passes} passed, {len(ck.fails)} failed")
    if ck.fails:
        for name in ck.fails:
            print(f"  failed: {name}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
