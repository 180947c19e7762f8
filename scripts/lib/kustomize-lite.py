"""Render a kustomization the way `kubectl kustomize` does, for the subset
this repository's kustomizations use: `resources` (files), `namespace`
(set on every object but a Namespace) and `images` (`newTag`/`newName` on
matching container and initContainer images). Anything else in the file
is an error, so a kustomization that grows past this subset fails the
check instead of being rendered wrong. Used by scripts/supply-check.sh
only where kubectl is not installed.

Usage: python kustomize-lite.py DIR > rendered.yaml
"""
import os
import sys

import yaml

KNOWN = {"apiVersion", "kind", "namespace", "resources", "images"}


def retag(image, rules):
    name, _, tag = image.partition(":")
    for r in rules:
        if r.get("name") == name:
            return "%s:%s" % (r.get("newName", name), r.get("newTag", tag))
    return image


def main(d):
    with open(os.path.join(d, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        sys.exit("kustomize-lite: unsupported fields %s; install kubectl" % sorted(unknown))
    out = []
    for res in k.get("resources", []):
        with open(os.path.join(d, res)) as f:
            for obj in yaml.safe_load_all(f):
                if not obj:
                    continue
                if "namespace" in k and obj.get("kind") != "Namespace":
                    obj.setdefault("metadata", {})["namespace"] = k["namespace"]
                spec = obj.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    c["image"] = retag(c["image"], k.get("images", []))
                out.append(obj)
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1])
