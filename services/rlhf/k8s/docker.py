"""Run the chart's pods as containers on a Docker engine, as a kubelet would: the chart is the one description.

:func:`pods_from_manifests` reads the rendered chart (Deployments, StatefulSets, Jobs and the ``helm test``
Pod); :class:`DockerCluster` runs each pod's containers with what its spec says — image, command/args, env
(values, Secret/ConfigMap keys, the downward API's name/namespace), ``runAsUser``/``runAsGroup`` with
``fsGroup`` as a supplementary group, ``readOnlyRootFilesystem``, dropped capabilities, no privilege
escalation, memory limits, volumes (emptyDir as a volume or tmpfs, a claim as a named volume shared by every
pod that mounts it, Secrets and ConfigMaps as read-only files), init containers in order — on one network
where every Service's DNS names resolve to the pods it selects (network aliases). It checks probes with the
kubelet's semantics (gRPC health, exec, HTTP, TCP; within ``initialDelaySeconds + failureThreshold *
periodSeconds``) and stops containers with SIGTERM and the pod's grace period.

Used by ``rlhf k8s up --docker`` (try the platform on one machine from the same images) and by the tests.
"""

from __future__ import annotations

import base64
import logging
import socket
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import docker
import grpc
import yaml
from docker.errors import NotFound
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.k8s.jobs import default_chart_dir, helm_engine

log = logging.getLogger(__name__)

WORKLOADS = ("Deployment", "StatefulSet", "Job", "Pod")
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}


@dataclass
class Pod:
    """One pod to run: a replica of a Deployment/StatefulSet, a Job's pod, or a bare Pod (``helm test``)."""

    name: str
    kind: str
    labels: dict
    spec: dict
    claim_templates: list[str] = field(default_factory=list)

    @property
    def grace_seconds(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))


def rendered_objects(
    values: dict, *, release: str, namespace: str, chart_dir: str | None = None
) -> list[dict]:
    """The chart rendered offline with the real Helm engine (values checked against its schema first)."""
    chart = helm_engine().Chart.load(str(chart_dir or default_chart_dir()))
    chart.validate_schema(values)
    manifests = chart.render(values, name=release, namespace=namespace)
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith(".txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def pods_from_manifests(objects: list[dict]) -> list[Pod]:
    """Every pod the rendered objects would create (one per replica; a Job's pod; a helm test Pod)."""
    pods = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind not in WORKLOADS:
            continue
        if kind == "Pod":
            pods.append(Pod(name, kind, obj["metadata"].get("labels", {}), obj["spec"]))
            continue
        template = obj["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        replicas = 1 if kind == "Job" else int(obj["spec"].get("replicas", 1))
        claims = [t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])]
        for i in range(replicas):
            pod_name = f"{name}-{i}" if kind == "StatefulSet" else (name if replicas == 1 else f"{name}-{i}")
            pods.append(Pod(pod_name, kind, labels, template["spec"], claims))
    return pods


def memory_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity ("8Gi", "512M", "1073741824") in bytes."""
    text = str(quantity)
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _decode(obj: dict) -> dict[str, bytes]:
    """A Secret's or ConfigMap's keys as bytes (Secret ``data`` is base64, ``stringData`` and ConfigMaps not)."""
    if obj["kind"] == "ConfigMap":
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data
    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    return data


class ProbeFailed(RuntimeError):
    """A probe did not pass within the chart's timing (what makes a kubelet restart or unready a pod)."""


class DockerCluster:
    """The rendered chart's objects on one Docker engine, under one network named after the release."""

    def __init__(self, objects: list[dict], *, namespace: str, prefix: str = "rlhf-k8s", client=None):
        self.client = client or docker.from_env()
        self.namespace = namespace
        self.prefix = prefix
        self.objects = objects
        self.by_kind: dict[tuple[str, str], dict] = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        self._remove_leftovers()  # of an earlier run under the same prefix that was killed before its close()
        self.files = Path(tempfile.mkdtemp(prefix=f"{prefix}-files-"))
        self.files.chmod(0o755)
        self.network = self.client.networks.create(f"{prefix}-net", driver="bridge")
        self.containers: dict[str, list] = {}
        self.volumes: dict[str, object] = {}

    def _remove_leftovers(self) -> None:
        label = f"rlhf.k8s/cluster={self.prefix}"
        for container in self.client.containers.list(all=True, filters={"label": label}):
            log.warning("removing container %s left by an earlier run", container.name)
            container.remove(force=True, v=True)
        for network in self.client.networks.list(names=[f"{self.prefix}-net"]):
            network.remove()
        for volume in self.client.volumes.list(filters={"name": f"{self.prefix}-"}):
            volume.remove(force=True)

    # ---- objects the pods refer to ----------------------------------------------------------------------

    def _data(self, kind: str, name: str) -> dict[str, bytes]:
        obj = self.by_kind.get((kind, name))
        if obj is None:
            raise KeyError(f"the chart rendered no {kind} {name!r}, which a pod refers to")
        return _decode(obj)

    def _aliases(self, pod: Pod) -> list[str]:
        """The DNS names a Service selecting this pod has: name, name.ns, name.ns.svc, ...cluster.local."""
        names = [pod.name]
        for obj in self.objects:
            if obj["kind"] == "Service" and _selects(obj["spec"].get("selector", {}), pod.labels):
                svc = obj["metadata"]["name"]
                ns = self.namespace
                names += [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
        return names

    def _env(self, pod: Pod, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("secretRef") or source.get("configMapRef")
            kind = "Secret" if "secretRef" in source else "ConfigMap"
            env.update({k: v.decode() for k, v in self._data(kind, ref["name"]).items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod.name, "metadata.namespace": self.namespace}[path]
            else:
                ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
                kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
                env[item["name"]] = self._data(kind, ref["name"])[ref["key"]].decode()
        return env

    def _volume(self, name: str, fs_group: int | None):
        """A named volume, made writable by the pod's fsGroup as the kubelet does for emptyDir and claims."""
        if name not in self.volumes:
            volume = self.client.volumes.create(f"{self.prefix}-{name}")
            if fs_group is not None:
                helper = self.client.containers.run(
                    self._any_image(),
                    ["-c", f"chown root:{fs_group} /v && chmod 2775 /v"],
                    user="0",
                    entrypoint=["sh"],
                    volumes={volume.name: {"bind": "/v", "mode": "rw"}},
                    detach=True,
                )
                helper.wait()
                helper.remove(v=True)
            self.volumes[name] = volume
        return self.volumes[name]

    def _any_image(self) -> str:
        for pod in pods_from_manifests(self.objects):
            return pod.spec["containers"][0]["image"]
        raise RuntimeError("no pod in the chart")

    def _files_of(self, pod: Pod, volume: dict) -> Path:
        """A Secret or ConfigMap volume as a folder of read-only files (only ``items`` when given)."""
        kind, ref = (
            ("Secret", volume["secret"]["secretName"])
            if "secret" in volume
            else ("ConfigMap", volume["configMap"]["name"])
        )
        source = volume.get("secret") or volume.get("configMap")
        data = self._data(kind, ref)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        folder = self.files / pod.name / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            path = folder / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            path.chmod(0o644)
        for p in [folder, *folder.parents][: len(folder.relative_to(self.files).parts)]:
            p.chmod(0o755)
        return folder

    def _mounts(self, pod: Pod, container: dict) -> tuple[dict, dict]:
        """(docker volumes, tmpfs) for the container's volumeMounts, as the pod's volumes define them."""
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        defined = {v["name"]: v for v in pod.spec.get("volumes", [])}
        volumes, tmpfs = {}, {}
        for mount in container.get("volumeMounts", []):
            mode = "ro" if mount.get("readOnly") else "rw"
            source = defined.get(mount["name"])
            if source is None and mount["name"] in pod.claim_templates:  # a StatefulSet's own claim
                volumes[self._volume(f"{mount['name']}-{pod.name}", fs_group).name] = {
                    "bind": mount["mountPath"],
                    "mode": mode,
                }
            elif "emptyDir" in source and source["emptyDir"].get("medium") == "Memory":
                tmpfs[mount["mountPath"]] = "mode=1777"
            elif "emptyDir" in source:
                volume = self._volume(f"{pod.name}-{mount['name']}", fs_group)
                volumes[volume.name] = {"bind": mount["mountPath"], "mode": mode}
            elif "persistentVolumeClaim" in source:
                volume = self._volume(source["persistentVolumeClaim"]["claimName"], fs_group)
                volumes[volume.name] = {"bind": mount["mountPath"], "mode": mode}
            elif "secret" in source or "configMap" in source:
                volumes[str(self._files_of(pod, source))] = {"bind": mount["mountPath"], "mode": "ro"}
            else:
                raise ValueError(f"{pod.name}: volume {mount['name']!r} of a kind this runner does not know")
        return volumes, tmpfs

    # ---- containers -------------------------------------------------------------------------------------

    def _run_options(self, pod: Pod, container: dict, index: int) -> dict:
        pod_security = pod.spec.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        volumes, tmpfs = self._mounts(pod, container)
        options = {
            "image": container["image"],
            "name": f"{self.prefix}-{pod.name}-{container['name']}",
            "environment": self._env(pod, container),
            "volumes": volumes,
            "tmpfs": tmpfs,
            "read_only": bool(security.get("readOnlyRootFilesystem")),
            "cap_drop": security.get("capabilities", {}).get("drop", []),
            "cap_add": security.get("capabilities", {}).get("add", []),
            "detach": True,
            "labels": {"rlhf.k8s/pod": pod.name, "rlhf.k8s/cluster": self.prefix},
        }
        if "runAsUser" in security:
            options["user"] = f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"
        if "fsGroup" in pod_security:
            options["group_add"] = [str(pod_security["fsGroup"])]
        if security.get("allowPrivilegeEscalation") is False:
            options["security_opt"] = ["no-new-privileges"]
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        if limit:
            options["mem_limit"] = memory_bytes(limit)
        if "command" in container:
            options["entrypoint"] = container["command"]
        if "args" in container:
            options["command"] = container["args"]
        if index == 0:
            options["network"] = self.network.name
        else:  # later containers share the first one's network namespace, as containers of a pod do
            options["network_mode"] = f"container:{self.containers[pod.name][0].id}"
        return options

    def _create(self, options: dict):
        network = options.pop("network", None)
        aliases = options.pop("aliases", None)
        container = self.client.containers.create(**{k: v for k, v in options.items() if k != "detach"})
        if network:
            self.network.connect(container, aliases=aliases)
        container.start()
        return container

    def start_pod(self, pod: Pod, init_timeout: float = 600) -> list:
        """Run the init containers one after another to success, then start the pod's containers."""
        for i, init in enumerate(pod.spec.get("initContainers", [])):
            options = self._run_options(pod, init, 0)
            options["name"] += f"-init{i}"
            options.pop("network")
            options["network"] = self.network.name
            container = self._create(options)
            status = container.wait(timeout=init_timeout)["StatusCode"]
            logs = container.logs(tail=30).decode(errors="replace")
            container.remove(v=True)
            if status != 0:
                raise RuntimeError(f"{pod.name}: init container {init['name']} exited {status}:\n{logs}")
        self.containers[pod.name] = []
        for i, spec in enumerate(pod.spec["containers"]):
            options = self._run_options(pod, spec, i)
            if i == 0:
                options["aliases"] = self._aliases(pod)
            else:
                options.pop("network_mode")
                options["network_mode"] = f"container:{self.containers[pod.name][0].id}"
            self.containers[pod.name].append(self._create(options))
        return self.containers[pod.name]

    def address(self, pod: Pod) -> str:
        """The pod's IP on the cluster network (reachable from this machine)."""
        container = self.containers[pod.name][0]
        container.reload()
        return container.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]

    def logs(self, pod: Pod, tail: int = 40) -> str:
        return "\n".join(
            c.logs(tail=tail).decode(errors="replace") for c in self.containers.get(pod.name, [])
        )

    # ---- probes -----------------------------------------------------------------------------------------

    def probe_once(self, pod: Pod, container_index: int, probe: dict) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        container = self.containers[pod.name][container_index]
        if "exec" in probe:
            return container.exec_run(probe["exec"]["command"]).exit_code == 0
        ip = self.address(pod)
        if "grpc" in probe:
            with grpc.insecure_channel(f"{ip}:{probe['grpc']['port']}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=timeout,
                    )
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        if "httpGet" in probe:
            url = f"http://{ip}:{probe['httpGet']['port']}{probe['httpGet'].get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as reply:
                    return 200 <= reply.status < 400
            except OSError:
                return False
        if "tcpSocket" in probe:
            try:
                socket.create_connection((ip, probe["tcpSocket"]["port"]), timeout=timeout).close()
                return True
            except OSError:
                return False
        raise ValueError(f"a probe of a kind this runner does not know: {sorted(probe)}")

    def wait_probe(self, pod: Pod, container_index: int, probe: dict, what: str) -> float:
        """Poll until the probe passes; fail past the kubelet's deadline. Returns the seconds it took."""
        start = time.monotonic()
        deadline = (
            start
            + probe.get("initialDelaySeconds", 0)
            + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
        )
        container = self.containers[pod.name][container_index]
        while True:
            if self.probe_once(pod, container_index, probe):
                return time.monotonic() - start
            container.reload()
            if container.status == "exited":
                raise ProbeFailed(f"{pod.name}: exited before its {what} probe passed:\n{self.logs(pod)}")
            if time.monotonic() > deadline:
                raise ProbeFailed(
                    f"{pod.name}: {what} probe still failing after the chart's timing\n{self.logs(pod)}"
                )
            time.sleep(min(1.0, probe.get("periodSeconds", 10)))

    def wait_ready(self, pod: Pod) -> dict[str, float]:
        """Startup, then readiness, then liveness probes of every container, as the kubelet runs them."""
        took = {}
        for i, spec in enumerate(pod.spec["containers"]):
            for what in ("startupProbe", "readinessProbe", "livenessProbe"):
                if what in spec:
                    took[f"{spec['name']}.{what}"] = self.wait_probe(pod, i, spec[what], what)
        return took

    # ---- ends -------------------------------------------------------------------------------------------

    def wait_exit(self, pod: Pod, timeout: float) -> list[int]:
        """Wait for every container of a run-to-completion pod (a Job, the helm test); their exit codes."""
        return [c.wait(timeout=timeout)["StatusCode"] for c in self.containers[pod.name]]

    def terminate(self, pod: Pod) -> list[tuple[int, float]]:
        """SIGTERM every container (SIGKILL after the pod's grace period): (exit code, seconds) each."""
        results = []
        for container in reversed(self.containers.get(pod.name, [])):
            start = time.monotonic()
            container.stop(timeout=pod.grace_seconds)
            code = container.wait(timeout=pod.grace_seconds + 30)["StatusCode"]
            results.append((code, time.monotonic() - start))
        return results

    def read_file(self, claim: str, path: str) -> bytes | None:
        """A file from a claim's volume (e.g. a Job's checkpoint), or None when it is not there."""
        volume = self._volume(claim, None)
        container = self.client.containers.create(
            self._any_image(), entrypoint=["true"], volumes={volume.name: {"bind": "/claim", "mode": "ro"}}
        )
        try:
            stream, _ = container.get_archive(f"/claim/{path.lstrip('/')}")
        except NotFound:
            return None
        finally:
            container.remove(v=True)
        with tarfile.open(fileobj=BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            return tar.extractfile(member).read() if member and member.isfile() else b""

    def put_folder(self, claim: str, source: Path, target: str, fs_group: int | None = None) -> None:
        """Copy a folder of this machine into a claim's volume (pre-filling models, as users do)."""
        volume = self._volume(claim, fs_group)

        def owned_by_fs_group(info: tarfile.TarInfo) -> tarfile.TarInfo:
            # what the kubelet does to a volume mounted with fsGroup: group-owned, group read-write
            info.uid, info.gid, info.uname, info.gname = 0, fs_group or 0, "", ""
            info.mode |= 0o070 if info.isdir() else 0o060
            return info

        buffer = BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(source, arcname=target.strip("/"), filter=owned_by_fs_group)
        container = self.client.containers.create(
            self._any_image(), entrypoint=["true"], volumes={volume.name: {"bind": "/claim", "mode": "rw"}}
        )
        try:
            container.put_archive("/claim", buffer.getvalue())
        finally:
            container.remove(v=True)

    def close(self) -> None:
        """Remove every container, volume and the network this cluster made, and its files."""
        for container in self.client.containers.list(
            all=True, filters={"label": f"rlhf.k8s/cluster={self.prefix}"}
        ):
            container.remove(force=True, v=True)
        for volume in self.volumes.values():
            volume.remove(force=True)
        self.network.remove()
        for path in sorted(self.files.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        self.files.rmdir()
