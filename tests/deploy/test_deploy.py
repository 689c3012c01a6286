"""Deployment without a Docker engine: the compose file through a real compose parser, the
image's own entrypoint and env on 127.0.0.1, and the real nginx of the `scale` profile in
front of two real replicas."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.service.conftest import CODEBOOK, Server, free_port, npy

ROOT = Path(__file__).resolve().parents[2]
# As root, nginx workers would run as nobody, who cannot enter pytest's private tmp dirs.
GLOBALS = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")


def dockerfile() -> dict[str, object]:
    """ENV, ENTRYPOINT, CMD and HEALTHCHECK of the runtime stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.split("AS runtime", 1)[1]
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            env |= dict(kv.split("=", 1) for kv in shlex.split(line[4:]))
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", stage, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.*)$", stage, re.M).group(1))  # type: ignore[union-attr]
    health = json.loads(re.search(r"HEALTHCHECK .*? CMD (\[.*\])", stage).group(1))  # type: ignore[union-attr]
    return {"env": env, "command": entry + cmd, "health": health}


def _image_env(data: Path, port: int) -> dict[str, str]:
    img = dockerfile()["env"]
    assert isinstance(img, dict)
    env = {**os.environ, **img}
    # the container's PATH points at its venv; here the test's interpreter stands in for it
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env |= {
        "VQSEARCH_HOST": "127.0.0.1",
        "VQSEARCH_PORT": str(port),
        "VQSEARCH_DATA_DIR": str(data),
    }
    return env


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("not healthy")


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="needs docker-compose (Debian package)"
)
def test_compose_file_is_valid_with_its_profiles():
    """docker-compose parses the file; the profiles have the volume, GPU and replica setup."""
    out = subprocess.run(
        ["docker-compose", "--profile", "scale", "--profile", "gpu", "--profile", "ray", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    doc = yaml.safe_load(out.stdout)
    s = doc["services"]
    assert "vqsearch-data" in doc["volumes"]
    main = s["vqsearch"]
    assert main["restart"] == "unless-stopped" and "healthcheck" in main
    assert main["deploy"]["resources"]["limits"]["memory"]
    assert "vqsearch-data:/data:rw" in main["volumes"]
    gpu = s["vqsearch-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    replica = s["replica"]
    assert replica["environment"]["VQSEARCH_READ_ONLY"] == "1"
    assert replica["volumes"] == ["vqsearch-data:/data:ro"]
    assert replica["deploy"]["replicas"] >= 2
    assert any(
        v.endswith("deploy/nginx.conf:/etc/nginx/nginx.conf:ro") for v in s["nginx"]["volumes"]
    )
    # ray: a head that runs the server on the cluster it starts, workers that join it, one
    # image with Ray in it, one data volume (the workers' read-only), no port or volume shared
    # with the plain server (a second writer would be refused the data dir's lock)
    head, worker = s["ray-head"], s["ray-worker"]
    start = " ".join(head["entrypoint"] + head["command"])
    assert "ray start --head --port=6379" in start
    assert "exec vqsearch serve --ray auto" in start
    assert worker["entrypoint"] + worker["command"][:2] == [
        "ray", "start", "--address=ray-head:6379"
    ]  # fmt: skip
    assert "--block" in worker["command"]
    assert head["build"]["args"]["WITH_RAY"] == worker["build"]["args"]["WITH_RAY"] == "1"
    assert head["image"] == worker["image"]
    assert head["volumes"] == ["vqsearch-ray-data:/data:rw"]
    assert worker["volumes"] == ["vqsearch-ray-data:/data:ro"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    published = [p["published"] for svc in ("vqsearch", "ray-head") for p in s[svc]["ports"]]
    assert len(set(published)) == 2


def test_image_entrypoint_and_env_start_the_server_and_shut_down_gracefully(tmp_path):
    """The Dockerfile's ENTRYPOINT + CMD with its ENV serve on 127.0.0.1, pass its own
    HEALTHCHECK, and on SIGTERM finish the request in flight before exiting cleanly."""
    image = dockerfile()
    assert image["command"] == ["vqsearch", "serve"]
    port = free_port()
    proc = subprocess.Popen(
        image["command"],
        env=_image_env(tmp_path, port),  # type: ignore[arg-type]
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        health = [a.replace("8000", str(port)) for a in image["health"]]  # type: ignore[union-attr]
        health[0] = sys.executable
        assert subprocess.run(health, timeout=10).returncode == 0
        rng = np.random.default_rng(0)
        xb = rng.standard_normal((20000, 128)).astype(np.float32)
        httpx.put(
            f"{url}/v1/banks/big",
            content=npy(xb),
            headers={"content-type": "application/x-npy"},
            timeout=60,
        ).raise_for_status()
        result: dict[str, object] = {}

        def slow_search() -> None:
            r = httpx.post(
                f"{url}/v1/banks/big/search?k=10",
                content=npy(xb),
                headers={"content-type": "application/x-npy"},
                timeout=120,
            )
            result["status"] = r.status_code

        t = threading.Thread(target=slow_search)
        t.start()
        time.sleep(0.5)  # the search is running
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result.get("status") == 200
        # uvicorn re-raises the SIGTERM it handled once shutdown is done (exit 143 in docker)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        proc.wait()
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(
        x.get("route") == "/v1/banks/{name}/search" and x.get("status") == 200 for x in lines
    )


def _nginx_conf(tmp: Path, listen: int, primary: int, replicas: list[int]) -> Path:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    ups = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in replicas)
    conf = re.sub(r"^\s*server replica:8000.*$", ups, conf, flags=re.M)
    conf = conf.replace("server primary:8000;", f"server 127.0.0.1:{primary};")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    conf = conf.replace(" /tmp/", f" {tmp}/")  # pid and temp paths, before the logs go there
    conf = conf.replace("/dev/stdout", f"{tmp}/access.log").replace(
        "/dev/stderr", f"{tmp}/error.log"
    )
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="needs nginx (Debian package)",
)
def test_nginx_spreads_reads_over_replicas_and_survives_one_dying(tmp_path):
    """Through the compose profile's nginx config: writes reach the primary, reads are spread
    over both replicas, and reads keep succeeding after one replica is killed."""
    data = tmp_path / "data"
    primary = Server(data).start()
    fast = {"VQSEARCH_READ_ONLY": "1", "VQSEARCH_REFRESH_SECONDS": "0.1"}
    replicas = [Server(data, **fast).start(), Server(data, **fast).start()]
    port = free_port()
    conf = _nginx_conf(tmp_path, port, primary.port, [r.port for r in replicas])
    nginx = subprocess.Popen(
        [
            shutil.which("nginx") or "/usr/sbin/nginx",
            "-c",
            str(conf),
            "-p",
            str(tmp_path),
            "-g",
            GLOBALS,
        ],
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        r = httpx.put(f"{url}/v1/banks/cb", json={"vectors": CODEBOOK.tolist()}, timeout=30)
        assert r.status_code == 201, r.text
        # the replicas pick the new bank up from the shared data dir
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(httpx.get(f"{s.url}/v1/banks/cb").status_code == 200 for s in replicas):
                break
            time.sleep(0.1)
        q = {"queries": CODEBOOK[:3].tolist(), "k": 1}
        used = set()
        for _ in range(40):
            r = httpx.post(f"{url}/v1/banks/cb/search", json=q, timeout=30)
            assert r.status_code == 200 and r.json()["ids"] == [[0], [1], [2]]
            used.add(r.headers["x-upstream"])
        assert used == {f"127.0.0.1:{s.port}" for s in replicas}
        replicas[0].stop(kill=True)
        for _ in range(20):
            r = httpx.post(f"{url}/v1/banks/cb/search", json=q, timeout=30)
            assert r.status_code == 200 and r.json()["ids"] == [[0], [1], [2]]
        w = httpx.post(
            f"{url}/v1/banks/cb/vectors", json={"vectors": CODEBOOK[:1].tolist()}, timeout=30
        )
        assert w.status_code == 200 and w.headers["x-upstream"] == f"127.0.0.1:{primary.port}"
    finally:
        nginx.terminate()
        nginx.wait(10)
        if nginx.stderr:
            nginx.stderr.close()
        for s in (primary, *replicas):
            s.stop()


def test_kuberay_manifest_runs_the_server_on_the_head_it_starts():
    """deploy/kuberay.yaml, read as Kubernetes would be given it (no KubeRay CRD schema
    installs offline, so its shape is checked here): a RayCluster at the pinned Ray version
    whose head starts Ray and then the server on it, workers on the same volume read-only,
    settings the server has, and a Service selecting the head."""
    from vqsearch.service import Settings

    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "kuberay.yaml").read_text())
    }
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster", "Service"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and rc["spec"]["rayVersion"] == pinned.group(1)
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    (c,) = head["containers"]
    script = " ".join(c["args"])
    assert "$KUBERAY_GEN_RAY_START_CMD &" in script
    assert script.index("ray health-check") < script.index("exec vqsearch serve --ray auto")
    fields = {f"VQSEARCH_{name.upper()}" for name in Settings.model_fields}
    assert {e["name"] for e in c["env"]} <= fields
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    claim = {"claimName": "vqsearch-data"}
    assert head["volumes"] == [{"name": "data", "persistentVolumeClaim": claim}]
    (workers,) = rc["spec"]["workerGroupSpecs"]
    wspec = workers["template"]["spec"]
    assert wspec["volumes"][0]["persistentVolumeClaim"] == {**claim, "readOnly": True}
    assert wspec["containers"][0]["volumeMounts"][0]["readOnly"] is True
    assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(wspec["containers"][0]["args"])
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    svc = docs["Service"]["spec"]
    assert svc["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert svc["ports"][0]["targetPort"] == "http"


def test_rayservice_manifest_serves_the_api_from_ray_serve_replicas():
    """deploy/rayservice.yaml (its shape checked here, as for kuberay.yaml): a RayService at
    the pinned Ray version whose Serve config names `vqsearch.ray:application` with arguments
    that build the application (read replicas autoscaled in front of one writer), the head
    on the data volume read-write (the writer runs there), the workers read-only."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from ray.serve import Application

    from vqsearch.ray import application
    from vqsearch.ray._serve import scaling
    from vqsearch.service import Settings

    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text())
    }
    assert set(docs) == {"PersistentVolumeClaim", "RayService"}
    rs = docs["RayService"]
    assert rs["apiVersion"] == "ray.io/v1"
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and rs["spec"]["rayClusterConfig"]["rayVersion"] == pinned.group(1)
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config["http_options"]["port"] == 8000
    (app,) = config["applications"]
    assert app["import_path"] == "vqsearch.ray:application" and app["route_prefix"] == "/"
    assert set(app["args"]) <= set(Settings.model_fields)
    assert isinstance(application(app["args"]), Application)
    scale = scaling(Settings(**app["args"]))
    assert scale == {"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}}
    fields = {f"VQSEARCH_{name.upper()}" for name in Settings.model_fields}
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod, ro in zip(pods, (False, True), strict=True):  # the writer runs on the head
        spec = pod["template"]["spec"]
        (c,) = spec["containers"]
        assert {e["name"] for e in c["env"]} <= fields
        assert {e["name"]: e["value"] for e in c["env"]}["VQSEARCH_DATA_DIR"] == "/data"
        claim = {"claimName": "vqsearch-data"} | ({"readOnly": True} if ro else {})
        assert spec["volumes"] == [{"name": "data", "persistentVolumeClaim": claim}]
        mount = {"name": "data", "mountPath": "/data"} | ({"readOnly": True} if ro else {})
        assert c["volumeMounts"] == [mount]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
