"""/proc/PID/cgroup -> pod (controller/agent/cgroups.py), on lines taken from real
nodes: containerd, CRI-O and dockershim/cri-dockerd, both kubelet cgroup drivers,
cgroup v1 (one line per hierarchy, named ones included) and v2, seen from the host and
from inside a container's own cgroup namespace. The container ids and UIDs are those of
the published examples (public test suites of profilers and container-security agents,
and the kubelet/CRI-O cgroup layouts they document)."""

from __future__ import annotations

import pytest

from detnet.controller.agent.cgroups import PodCgroup, parse_proc_cgroup, pod_of_path

CID_A = "a534eb629135e43beb13213976e37bb2ab95cba4c0d1d0b4e27c6bc4d8091b83"
CID_CRIO = "0ecc7949cbaf17e883264ea1055f60b184a7cb264fd759c4a692e1155086fe2d"
CID_DOCKER = "656959d9ee87a0b131c601ce9d9f8f76b1dda60e8608c503b5979d849cbdc714"
CID_B = "47e320f795efcec1ecf2001c3a09c95e3701ed87de8256837b70b10e23818251"
CID_V1 = "3e74d3fd9db4c9dd921ae05c2502fb984d0cde1b36e581b13f79c639da4518a1"
CID_DEV = "7edda1de1e0d1d366351e478359cf5fa16bb8ab53063a99bb119e56971bfb7e2"
CID_NV = "2cc65c162ca1388b6b8d5ccfb701d22fc96675ccf8b2f1590c490c2c4039547f"
CID_KIND = "1207db63eaeb133a85d2b614d12d95d4dff3f29af60d7a7b3c7d39abdf4bd119"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # containerd, systemd driver, cgroup v1 (a controller line)
        (
            "12:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"471203d1_984f_477e_9c35_db96487ffe5e.slice/cri-containerd-{CID_A}.scope",
            PodCgroup("471203d1-984f-477e-9c35-db96487ffe5e", "Burstable", "systemd", CID_A),
        ),
        # CRI-O, systemd driver, cgroup v2
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"b57320a0_e7eb_4ac8_a791_4c4472796867.slice/crio-{CID_CRIO}.scope",
            PodCgroup("b57320a0-e7eb-4ac8-a791-4c4472796867", "Burstable", "systemd", CID_CRIO),
        ),
        # docker, systemd driver, cgroup v2, read from inside a container's cgroup namespace
        (
            "0::/../../kubepods-besteffort-pod88f6f4e3_59c0_4ce8_9ecf_391c8b5a60ad.slice/"
            f"docker-{CID_DOCKER}.scope",
            PodCgroup("88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad", "BestEffort", "systemd", CID_DOCKER),
        ),
        (
            "0::/../../kubepods-besteffort-podfd698699_eabf_4c23_92ef_cf0bbdb78261.slice/"
            f"docker-{CID_NV}.scope",
            PodCgroup("fd698699-eabf-4c23-92ef-cf0bbdb78261", "BestEffort", "systemd", CID_NV),
        ),
        # containerd, systemd driver, cgroup v2, from the host
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"f9a04ecc_1875_491b_926c_d2f64757704e.slice/cri-containerd-{CID_B}.scope",
            PodCgroup("f9a04ecc-1875-491b-926c-d2f64757704e", "Burstable", "systemd", CID_B),
        ),
        # docker, cgroupfs driver, cgroup v1
        (
            f"11:devices:/kubepods/besteffort/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}",
            PodCgroup("85adbef3-622f-4ef2-8f60-a8bdf3eb6c72", "BestEffort", "cgroupfs", CID_DEV),
        ),
        # cgroupfs driver, the named systemd hierarchy of cgroup v1
        (
            "1:name=systemd:/kubepods/besteffort/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/" + CID_V1,
            PodCgroup("3d274242-8ee0-11e9-a8a6-1e68d864ef1a", "BestEffort", "cgroupfs", CID_V1),
        ),
        # cgroupfs driver, two controllers in one hierarchy
        (
            "8:cpu,cpuacct:/kubepods/burstable/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/" + CID_V1,
            PodCgroup("3d274242-8ee0-11e9-a8a6-1e68d864ef1a", "Burstable", "cgroupfs", CID_V1),
        ),
        # guaranteed: no QoS level, both drivers (k3s/containerd cgroupfs; CRI-O systemd)
        (
            f"0::/kubepods/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}",
            PodCgroup("85adbef3-622f-4ef2-8f60-a8bdf3eb6c72", "Guaranteed", "cgroupfs", CID_DEV),
        ),
        (
            "0::/kubepods.slice/kubepods-pod471203d1_984f_477e_9c35_db96487ffe5e.slice/"
            f"crio-{CID_CRIO}.scope",
            PodCgroup("471203d1-984f-477e-9c35-db96487ffe5e", "Guaranteed", "systemd", CID_CRIO),
        ),
        # CRI-O with the cgroupfs driver names its container directories crio-<id>
        (
            f"0::/kubepods/burstable/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/crio-{CID_CRIO}",
            PodCgroup("85adbef3-622f-4ef2-8f60-a8bdf3eb6c72", "Burstable", "cgroupfs", CID_CRIO),
        ),
        # kind: kubelet's --cgroup-root=/kubelet prefixes every slice
        (
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            "kubelet-kubepods-besteffort-pod26a1a59b_8013_459b_9a20_a611facb1888.slice/"
            f"cri-containerd-{CID_KIND}.scope",
            PodCgroup("26a1a59b-8013-459b-9a20-a611facb1888", "BestEffort", "systemd", CID_KIND),
        ),
        # cgroupfs seen from a cgroup namespace: the QoS level is above the common ancestor
        (
            f"0::/../../pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}",
            PodCgroup("85adbef3-622f-4ef2-8f60-a8bdf3eb6c72", None, "cgroupfs", CID_DEV),
        ),
        (
            f"0::/../besteffort/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}",
            PodCgroup("85adbef3-622f-4ef2-8f60-a8bdf3eb6c72", "BestEffort", "cgroupfs", CID_DEV),
        ),
        # a static pod: its UID is the manifest's hash
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"5f0e1a9b3c4d4e8f9a0b1c2d3e4f5a6b.slice/cri-containerd-{CID_A}.scope",
            PodCgroup("5f0e1a9b3c4d4e8f9a0b1c2d3e4f5a6b", "Burstable", "systemd", CID_A),
        ),
    ],
)
def test_real_lines(text: str, expected: PodCgroup) -> None:
    assert parse_proc_cgroup(text) == expected


def test_a_whole_cgroup_v1_file_systemd_driver() -> None:
    pod = "kubepods-besteffort-pod88f6f4e3_59c0_4ce8_9ecf_391c8b5a60ad.slice"
    path = f"/kubepods.slice/kubepods-besteffort.slice/{pod}/cri-containerd-{CID_A}.scope"
    controllers = [
        "misc", "rdma", "pids", "hugetlb", "net_prio,net_cls", "perf_event", "memory",
        "devices", "blkio", "freezer", "cpuset", "cpu,cpuacct",
    ]  # fmt: skip
    lines = [f"{13 - i}:{c}:{path}" for i, c in enumerate(controllers)]
    lines.append(f"1:name=systemd:{path}")
    lines.append("0::/")  # hybrid hosts: the unified line may stay at the root
    assert parse_proc_cgroup("\n".join(lines) + "\n") == PodCgroup(
        "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad", "BestEffort", "systemd", CID_A
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0::/",
        "0::/../../user.slice/user-501.slice/session-3.scope",
        "0::/system.slice/containerd.service",
        f"10:pids:/docker/{CID_V1}",  # plain docker, no kubelet
        f"2:cpu:/system.slice/docker-{CID_NV}.scope",
        # the pod's own slice, no container below it
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod471203d1_984f_477e_9c35_db96487ffe5e.slice",
        # CRI-O's conmon sits in the pod's cgroup but in the host's network namespace
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"b57320a0_e7eb_4ac8_a791_4c4472796867.slice/crio-conmon-{CID_CRIO}.scope",
        f"0::/kubepods/burstable/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/crio-conmon-{CID_CRIO}",
        # nested below a container: maybe another network namespace (a runtime in the pod)
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"471203d1_984f_477e_9c35_db96487ffe5e.slice/cri-containerd-{CID_A}.scope/init.scope",
        # a pod<hex> directory that is not under a kubepods level
        f"0::/srv/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}",
        # malformed lines
        "garbage",
        "x:memory:/kubepods/burstable/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/" + CID_DEV,
        "4:memory",
        "4:memory:relative/path",
        "0::/kubepods/burstable/podnot-a-uid/" + CID_DEV,
    ],
)
def test_not_a_container_of_a_pod(text: str) -> None:
    assert parse_proc_cgroup(text) is None


def test_lines_naming_two_pods_give_no_answer() -> None:
    a = f"/kubepods/besteffort/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}"
    b = f"/kubepods/besteffort/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/{CID_DEV}"
    assert parse_proc_cgroup(f"4:memory:{a}\n3:cpu:{b}\n") is None
    # ...and so do two containers of one pod
    c = f"/kubepods/besteffort/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_V1}"
    assert parse_proc_cgroup(f"4:memory:{a}\n3:cpu:{c}\n") is None


def test_a_visible_qos_wins_over_a_hidden_one() -> None:
    hidden = f"0::/../../pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}"
    seen = f"4:memory:/kubepods/burstable/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}"
    pod = parse_proc_cgroup(f"{hidden}\n{seen}\n")
    assert pod is not None
    assert pod.qos == "Burstable"


def test_uids_are_normalised_to_the_api_form() -> None:
    pod = pod_of_path(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        f"88F6F4E3_59C0_4CE8_9ECF_391C8B5A60AD.slice/cri-containerd-{CID_A.upper()}.scope"
    )
    assert pod == PodCgroup("88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad", "BestEffort", "systemd", CID_A)


def test_huge_input_is_read_only_up_to_the_bound() -> None:
    line = f"0::/kubepods/besteffort/pod85adbef3-622f-4ef2-8f60-a8bdf3eb6c72/{CID_DEV}\n"
    assert parse_proc_cgroup("x" * 10_000_000 + "\n" + line) is None  # beyond the bound
    assert parse_proc_cgroup(line + "x" * 10_000_000) is not None
