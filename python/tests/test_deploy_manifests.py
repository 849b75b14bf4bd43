"""deploy/kubernetes against the Kubernetes API's own OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors), and the properties the deployment relies on."""

import copy
import pathlib

import kubernetes_validate
import pytest
import yaml

KUBERNETES = "1.37.0"
DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
DOCUMENTS = [
    (f"{path.name}#{index}", document)
    for path in sorted(DEPLOY.glob("*.yaml"))
    for index, document in enumerate(yaml.safe_load_all(path.read_text()))
    if document
]


def resource(kind, component):
    return next(
        document
        for _, document in DOCUMENTS
        if document["kind"] == kind and document["metadata"]["labels"]["app.kubernetes.io/component"] == component
    )


def test_every_resource_is_there():
    kinds = sorted((document["kind"], document["metadata"]["name"]) for _, document in DOCUMENTS)
    assert kinds == [
        ("Deployment", "tessera-coordinator"),
        ("Service", "tessera-coordinator"),
        ("Service", "tessera-worker"),
        ("StatefulSet", "tessera-worker"),
    ]


@pytest.mark.parametrize("name,document", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_each_resource_validates_against_the_schema(name, document):
    kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_validator_refuses_a_broken_resource():
    broken = copy.deepcopy(resource("StatefulSet", "worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "often"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    unknown = copy.deepcopy(resource("Deployment", "coordinator"))
    unknown["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES, strict=True)


def test_workers_are_named_by_their_pods_and_advertise_their_ip():
    workers = resource("StatefulSet", "worker")
    container = workers["spec"]["template"]["spec"]["containers"][0]
    assert "--node-id=$(POD_NAME)" in container["args"]
    assert "--advertise-host=$(POD_IP)" in container["args"]
    fields = {variable["name"]: variable["valueFrom"]["fieldRef"]["fieldPath"] for variable in container["env"]}
    assert fields == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    assert workers["spec"]["serviceName"] == "tessera-worker"


@pytest.mark.parametrize("kind,component", [("Deployment", "coordinator"), ("StatefulSet", "worker")])
def test_probes_limits_and_certificates(kind, component):
    spec = resource(kind, component)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["resources"]["limits"]["memory"]
    assert "--certs=/etc/tessera/certs" in container["args"]
    assert not any(argument.startswith("--insecure") for argument in container["args"])
    secrets = {volume["secret"]["secretName"] for volume in spec["volumes"]}
    assert secrets == {"tessera-certs", "tessera-admin-token"}
    # The coordinator must never claim a brand-new cluster: a restarted pod rebuilds from the workers.
    assert "--new-cluster" not in container["args"]
