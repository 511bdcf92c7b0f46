"""Checks the Artifact Hub annotations of a Helm chart's Chart.yaml as Artifact Hub parses them
(its own linter, `ah lint`, is not on the Go module proxy): run by scripts/test with the
kubernetes-validate virtualenv's Python (it has PyYAML).

    python scripts/check-artifacthub.py charts/chat/Chart.yaml Cargo.toml
"""
import re, sys, tomllib, yaml

chart_path, cargo_path = sys.argv[1:]
chart = yaml.safe_load(open(chart_path))
license_ = tomllib.load(open(cargo_path, "rb"))["workspace"]["package"]["license"]
errors = []
def err(key, msg): errors.append(f"{chart_path}: annotation artifacthub.io/{key}: {msg}")
def is_str(v): return isinstance(v, str) and v.strip() != ""
def url(v): return is_str(v) and re.match(r"^https?://[^\s/]+", v) is not None
def yaml_list(key, v):
    try:
        items = yaml.safe_load(v)
    except yaml.YAMLError as e:
        err(key, f"not YAML: {e}"); return []
    if not isinstance(items, list) or not items:
        err(key, "must be a non-empty YAML list"); return []
    return items
def entries(key, v, fields, check=None):
    for i, item in enumerate(yaml_list(key, v)):
        if not isinstance(item, dict):
            err(key, f"entry {i} is not a mapping: {item!r}"); continue
        for f in fields:
            if not is_str(item.get(f)):
                err(key, f"entry {i} has no {f} (a string)")
        if "url" in fields and is_str(item.get("url")) and not url(item["url"]):
            err(key, f"entry {i}: {item['url']!r} is not an http(s) URL")
        if check:
            check(i, item)

BOOLS = ("containsSecurityUpdates", "prerelease", "operator")
CATEGORIES = ("ai-machine-learning", "database", "integration-delivery", "monitoring-logging",
              "networking", "security", "storage", "streaming-messaging", "skip-prediction")
KINDS = ("added", "changed", "deprecated", "removed", "fixed", "security")
KNOWN = BOOLS + ("alternativeName", "category", "changes", "crds", "crdsExamples", "images",
                 "license", "links", "maintainers", "operatorCapabilities", "recommendations",
                 "screenshots", "signKey")

ann = {k[len("artifacthub.io/"):]: v for k, v in (chart.get("annotations") or {}).items()
       if k.startswith("artifacthub.io/")}
for key in ("license", "links", "images", "changes", "category", "containsSecurityUpdates"):
    if key not in ann:
        err(key, "missing")
for key, v in ann.items():
    if key not in KNOWN:
        err(key, "not an annotation Artifact Hub knows (misspelt?)"); continue
    if not isinstance(v, str):
        err(key, "must be a string (YAML inside a block scalar)"); continue
    if key in BOOLS and v not in ("true", "false"):
        err(key, f"must be \"true\" or \"false\", not {v!r}")
    elif key == "category" and v not in CATEGORIES:
        err(key, f"{v!r} is not one of {', '.join(CATEGORIES)}")
    elif key == "license" and v != license_:
        err(key, f"{v!r} is not the workspace's license in {cargo_path} ({license_!r})")
    elif key == "links":
        entries(key, v, ("name", "url"))
    elif key == "maintainers":
        entries(key, v, ("name", "email"))
    elif key == "images":
        def image(i, item):
            ref = str(item.get("image", ""))
            if not re.match(r"^[a-z0-9]+([._/-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$", ref):
                err(key, f"entry {i}: {ref!r} is not an image reference")
            elif ref.rsplit("/", 1)[-1].partition(":")[2].split("@")[0] != str(chart["appVersion"]):
                err(key, f"entry {i}: {ref!r} is not at the chart's appVersion {chart['appVersion']}")
        entries(key, v, ("name", "image"), image)
    elif key == "changes":
        for i, item in enumerate(yaml_list(key, v)):
            if isinstance(item, str):
                continue
            if not isinstance(item, dict) or not is_str(item.get("description")):
                err(key, f"entry {i} is neither a string nor a mapping with a description"); continue
            if str(item.get("kind", "")).lower() not in KINDS:
                err(key, f"entry {i}: kind {item.get('kind')!r} is not one of {', '.join(KINDS)}")
            for link in item.get("links") or []:
                if not (isinstance(link, dict) and is_str(link.get("name")) and url(link.get("url"))):
                    err(key, f"entry {i}: a link without name and http(s) url: {link!r}")
    elif key == "alternativeName" and v not in chart["name"] and chart["name"] not in v:
        err(key, "must be a substring or a superstring of the chart's name")
for e in errors:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
