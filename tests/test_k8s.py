"""jobs/k8s/: the manifests pass ``kubernetes-validate --strict``, and their container
commands, run here once per JOB_COMPLETION_INDEX (no control plane can run on these
machines), collect to the same tiles as one plain process."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import batch_helpers as bh

MANIFESTS = sorted(bh.K8S.glob("*.yaml"))


def _validate(*paths: Path, version: str | None = None) -> subprocess.CompletedProcess:
    cmd = [bh.exe("kubernetes-validate"), "--strict", *(["-k", version] if version else []), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", [None, "1.30.0"])  # the default (newest) and the oldest we claim
def test_manifests_pass_strict_validation(version):
    assert {p.name for p in MANIFESTS} >= {"indexed-job.yaml", "indexed-job-gpu.yaml", "collect-job.yaml", "cronjob.yaml"}
    p = _validate(*MANIFESTS, version=version)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed") == len(MANIFESTS), p.stdout


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    doc = yaml.safe_load((bh.K8S / "indexed-job.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo of volumeMounts
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    p = _validate(bad)
    assert p.returncode != 0 and "volumeMount" in p.stdout + p.stderr


def _run_container(doc: dict, data: Path, **extra_env: str) -> tuple[int, str]:
    p = bh.start_container(doc, data, **extra_env)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


@pytest.mark.parametrize("manifest_file", ["indexed-job.yaml", "indexed-job-gpu.yaml"])
def test_exit_codes_end_what_a_retry_cannot_mend(manifest_file):
    """tilescan's exit codes in the Job's podFailurePolicy: a bad config or model (2, 5) fails
    the Job; failed scenes (3, 4) end their index without retries that would redo the same bad
    files; a stop (75) is retried and does not count."""
    rules = yaml.safe_load((bh.K8S / manifest_file).read_text())["spec"]["podFailurePolicy"]["rules"]
    by_action = {r["action"]: sorted(r["onExitCodes"]["values"]) for r in rules if "onExitCodes" in r}
    assert by_action == {"FailJob": [2, 5], "Ignore": [75], "FailIndex": [3, 4, 6]}


def test_gpu_job_is_the_cpu_job_with_one_gpu_per_pod():
    cpu, gpu = (yaml.safe_load((bh.K8S / name).read_text()) for name in ("indexed-job.yaml", "indexed-job-gpu.yaml"))
    c, g = bh.container(cpu), bh.container(gpu)
    assert g["command"] + g["args"] == c["command"] + c["args"]  # so the per-index run below covers both
    assert g["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in g["resources"].get("requests", {})  # extended resources: limits alone
    env = {e["name"]: e["value"] for e in g["env"]}
    assert env["KERAS_BACKEND"] == "jax"
    # one reader per requested CPU: with no CPU limit, auto would count every core of the node
    assert "cpu" not in g["resources"]["limits"] and env["TILESCAN_INFERENCE__READER_THREADS"] == g["resources"]["requests"]["cpu"]
    for key in ("podFailurePolicy", "backoffLimitPerIndex", "completionMode"):
        assert gpu["spec"][key] == cpu["spec"][key], key
    assert gpu["spec"]["template"]["spec"]["volumes"] == cpu["spec"]["template"]["spec"]["volumes"]
    assert gpu["metadata"]["name"] != cpu["metadata"]["name"]  # both can exist in one namespace


def test_gpu_image_installs_the_gpu_extra():
    import tomllib

    docker = (bh.K8S / "Dockerfile.gpu").read_text()
    extras = tomllib.loads((bh.JOBS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', docker)
    assert any(d.startswith("jax[cuda12]") for d in extras["gpu"])
    assert re.search(r"^ENV .*KERAS_BACKEND=jax", docker, re.M)
    image = bh.container(yaml.safe_load((bh.K8S / "indexed-job-gpu.yaml").read_text()))["image"]
    assert f"-t {image} " in docker  # the build command in its header makes the image the Job names


@pytest.mark.slow
@pytest.mark.parametrize("manifest", ["indexed-job.yaml", "indexed-job-gpu.yaml"])
def test_indexed_job_per_index_equals_one_process(tmp_path, tmp_path_factory, manifest):
    job = yaml.safe_load((bh.K8S / manifest).read_text())
    spec = job["spec"]
    n = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == n
    env = {e["name"]: e["value"] for e in bh.container(job)["env"]}
    assert env["TILESCAN_SHARD_COUNT"] == str(n)  # tilescan must know N: the pod only gets its index
    data = tmp_path / "data"
    bh.scene_folder(data / "scenes")
    # the pods of the Job, run side by side as its parallelism says
    # no GPU (nor JAX) here: the GPU Job's pods compute on this CPU with TensorFlow
    backend = {"KERAS_BACKEND": "tensorflow"} if "gpu" in manifest else {}
    pods = [bh.start_container(job, data, JOB_COMPLETION_INDEX=str(i), **backend) for i in range(n)]
    for i, pod in enumerate(pods):
        _, err = pod.communicate(timeout=600)
        assert pod.returncode == 0, f"index {i}: {err}"
    out = data / "out"
    reports = [json.loads((out / f"report-shard-{i:04d}-of-{n:04d}.json").read_text()) for i in range(n)]
    assert sorted(u["unit"] for r in reports for u in r["done"]) == sorted(bh.UNITS)
    rc, err = _run_container(yaml.safe_load((bh.K8S / "collect-job.yaml").read_text()), data)
    assert rc == 0, err
    bh.assert_same_tiles(bh.collected(out), bh.collected(bh.reference(tmp_path_factory)), exact=True)


@pytest.mark.slow
def test_cronjob_command_equals_one_process(tmp_path, tmp_path_factory):
    cron = yaml.safe_load((bh.K8S / "cronjob.yaml").read_text())
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # a slow night never overlaps the next
    assert len(cron["spec"]["schedule"].split()) == 5
    data = tmp_path / "data"
    bh.scene_folder(data / "scenes")
    rc, err = _run_container(cron, data)
    assert rc == 0, err
    assert "collect:" in err  # the same command collected after running
    bh.assert_same_tiles(bh.collected(data / "out"), bh.collected(bh.reference(tmp_path_factory)), exact=True)


def test_pods_run_as_the_images_own_user_not_root():
    """Every manifest's pod runs as the non-root user the images create (a cluster enforcing the
    "restricted" Pod Security Standard admits them), its volume writable to that group."""
    ids = set()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        docker = (bh.K8S / name).read_text()
        (user,) = re.findall(r"^USER (\d+):(\d+)$", docker, re.M)
        assert re.search(rf"useradd --uid {user[0]} ", docker)
        ids.add(tuple(map(int, user)))
    ((uid, gid),) = ids
    assert uid != 0
    for path in MANIFESTS:
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        spec = (doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"])["template"]["spec"]
        sc = spec["securityContext"]
        assert (sc["runAsNonRoot"], sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (True, uid, gid, gid), path.name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        c = bh.container(doc)["securityContext"]
        assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"], path.name


def test_cronjob_ends_at_once_on_what_a_retry_cannot_mend():
    """The nightly Job fails at once on exit codes a retry would repeat, and a stop (75) or an
    eviction does not count against its backoffLimit: the next pod resumes."""
    spec = yaml.safe_load((bh.K8S / "cronjob.yaml").read_text())["spec"]["jobTemplate"]["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    by_action = {r["action"]: sorted(r["onExitCodes"]["values"]) for r in rules if "onExitCodes" in r}
    assert by_action == {"FailJob": [2, 3, 4, 5, 6], "Ignore": [75]}
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget"
               for r in rules if "onPodConditions" in r)
