#!/usr/bin/env bash
# Build the agent and controller images from deploy/Dockerfile with podman and run them the way a
# cluster does, on this host's kernel:
#   1. the agent with exactly the DaemonSet's security context (CAP_BPF, CAP_PERFMON,
#      CAP_SYS_RESOURCE, CAP_NET_ADMIN; read-only root; host pid namespace; host BTF, tracefs and cgroupfs),
#      under podman's default seccomp profile and then under deploy/seccomp/tapio-agent.json,
#      in its own cgroup namespace: a refused loopback connect on the host must be reported, and
#      an ordinary workload container's exit code 3 attributed to that container's id;
#   2. the same agent image under containerd (started here with a private root, state and
#      socket) with containerd's default profile and with the shipped one;
#   3. the controller as uid 65532 with a read-only root, answering /healthz;
#   4. both images' sizes (agent <= 200 MiB).
# No registry is reachable from CI: the FROM base is a debootstrap'ed Debian bookworm imported
# into podman once and kept (localhost/tapio-base:bookworm; remove it to rebuild). The host's CA
# bundle reaches pip as a build secret, as for any build behind a TLS-intercepting proxy.
# Everything else it creates (containers, images, containerd, mounts, cgroups) is removed on every
# exit path. Loads BPF: run under `flock /tmp/tapio-kernel.lock` when others share the host.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

if [[ $(id -u) -ne 0 ]]; then
  echo "image-test: run as root" >&2
  exit 1
fi
for tool in podman runc containerd ctr debootstrap python3; do
  command -v "$tool" >/dev/null || { echo "image-test: $tool missing (scripts/setup.sh --test)" >&2; exit 1; }
done

BASE=localhost/tapio-base:bookworm
TAG="it-$$"
AGENT_IMAGE="localhost/tapio/agent:$TAG"
CONTROLLER_IMAGE="localhost/tapio/controller:$TAG"
BUILD_CACHE=localhost/tapio/build-cache:latest
CA_BUNDLE=${TAPIO_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
AGENT_MAX_MIB=200
# The agent resolves cgroup ids through the host's cgroupfs, mounted where the DaemonSet mounts it.
HOST_CGROUPFS=/host/sys/fs/cgroup
WAIT=90 # seconds: the bound of every wait below
# crun refuses this host's hybrid cgroup layout; runc handles it. Small limits so a build or a
# container cannot exhaust the shared machine.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
work=$(mktemp -d /tmp/tapio-image.XXXXXX)
top="tapio-image-$$" # our cgroups live below this name in every hierarchy
ctd_sock="$work/containerd/containerd.sock"
ctd_pid=""
CTR=(ctr --address "$ctd_sock" --namespace tapio)
passed=0
failed=0

log() { printf 'image-test [%4ds] %s\n' $((SECONDS - t0)) "$*"; }
pass() { log "ok: $*"; passed=$((passed + 1)); }
fail() { log "FAIL: $*"; failed=$((failed + 1)); }
check() { # what command...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

cleanup() {
  set +e
  for c in $(podman ps -a --filter "label=tapio-image-test=$$" --format '{{.ID}}' 2>/dev/null); do
    timeout 20 podman rm -f -t 2 "$c" >/dev/null 2>&1
  done
  timeout 60 podman rmi -f "$AGENT_IMAGE" "$CONTROLLER_IMAGE" >/dev/null 2>&1
  timeout 120 podman image prune -f >/dev/null 2>&1
  if [[ -n "$ctd_pid" ]]; then
    for c in $(timeout 10 "${CTR[@]}" tasks ls -q 2>/dev/null); do
      timeout 10 "${CTR[@]}" tasks kill -s KILL "$c" >/dev/null 2>&1
      timeout 10 "${CTR[@]}" tasks delete -f "$c" >/dev/null 2>&1
    done
    for c in $(timeout 10 "${CTR[@]}" containers ls -q 2>/dev/null); do
      timeout 10 "${CTR[@]}" containers delete "$c" >/dev/null 2>&1
    done
    kill "$ctd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$ctd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$ctd_pid" 2>/dev/null
    # shims outlive containerd by design; ours are found by their socket directory.
    shims=$(grep -l -- "$work/containerd" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3)
    for p in $shims; do kill -9 "$p" 2>/dev/null; done
  fi
  grep -- " $work" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  for h in /sys/fs/cgroup/*/"$top" /sys/fs/cgroup/"$top"; do
    [[ -d "$h" ]] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Poll "$@" every half second until it succeeds or $WAIT seconds pass.
wait_for() {
  local deadline=$((SECONDS + WAIT))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# ---- base image ------------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  log "creating $BASE with debootstrap (cached for later runs)"
  root="$work/rootfs"
  timeout 900 debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  # What Debian's -slim images drop: downloaded packages, package lists, logs, documentation
  # (copyright files stay), man pages and translations.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  find "$root"/usr/share/doc -type f ! -name copyright -delete
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
fi

# ---- build -----------------------------------------------------------------------------------
build() { # target image
  timeout 1200 "${PODMAN[@]}" build --network host "${LIMITS[@]}" \
    -f deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore --target "$1" \
    --build-arg DEBIAN_IMAGE="$BASE" --build-arg DEBIAN_SLIM_IMAGE="$BASE" \
    --build-arg TAPIO_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || true)" \
    --secret id=pipcert,src="$CA_BUNDLE" \
    --label tapio-image-test="$$" -t "$2" . >"$work/build-$1.log" 2>&1 \
    || { tail -40 "$work/build-$1.log"; log "build of $1 failed"; exit 1; }
}
log "building $AGENT_IMAGE and $CONTROLLER_IMAGE"
build agent "$AGENT_IMAGE"
build controller "$CONTROLLER_IMAGE"
# Name the build stage so its layers (the compiler packages) stay cached for the next run; the
# previous run's, now untagged, is pruned on exit.
build build "$BUILD_CACHE"
log "images built"

# ---- the agent -------------------------------------------------------------------------------
# From here on BPF programs are loaded into the host kernel: hold the kernel lock shared by all
# kernel tests (released when the script exits), but not during the builds.
exec {lockfd}>/tmp/tapio-kernel.lock
flock -w 900 "$lockfd" || { log "kernel lock busy for 900 s"; exit 1; }
cat >"$work/tapio.toml" <<'EOF'
[container]
exit_scope = "containers"
EOF
mkdir -p "$work/data"
# Exactly the DaemonSet's capabilities. A host whose own bounding set lacks one (this CI host
# has no CAP_SYS_RESOURCE) cannot grant it: the runtimes then start the container without it, so
# the agent's bounding set must be the DaemonSet's set intersected with the host's.
caps=(BPF PERFMON SYS_RESOURCE NET_ADMIN)
want_capbnd=$(python3 - "${caps[@]}" <<'EOF'
import sys
bit = {"BPF": 39, "PERFMON": 38, "SYS_RESOURCE": 24, "NET_ADMIN": 12}
host = int(open("/proc/self/status").read().split("CapBnd:")[1].split()[0], 16)
want = sum(1 << bit[c] for c in sys.argv[1:])
if want & ~host:
    missing = [c for c in sys.argv[1:] if not host >> bit[c] & 1]
    print(f"image-test: the host's bounding set lacks {missing}: expect them absent", file=sys.stderr)
print(format(want & host, "016x"))
EOF
)
ctr_caps=()
for c in "${caps[@]}"; do
  case $c in BPF) b=39 ;; PERFMON) b=38 ;; SYS_RESOURCE) b=24 ;; NET_ADMIN) b=12 ;; esac
  ((0x$want_capbnd >> b & 1)) && ctr_caps+=("$c")
done

run_agent_podman() { # name [podman-option...] (seccomp: podman's default unless given)
  local name=$1
  shift
  local cap_args=()
  for c in "${caps[@]}"; do cap_args+=(--cap-add "$c"); done
  "${PODMAN[@]}" run -d --name "$name" --label tapio-image-test="$$" "${LIMITS[@]}" \
    --cap-drop all "${cap_args[@]}" --security-opt no-new-privileges "$@" \
    --read-only --pid host --cgroupns private --network none \
    -v /sys/kernel/btf:/sys/kernel/btf:ro -v /sys/kernel/tracing:/sys/kernel/tracing:ro \
    -v /sys/fs/cgroup:"$HOST_CGROUPFS":ro,rbind -e TAPIO_CGROUP_ROOT="$HOST_CGROUPFS" \
    -v "$work/tapio.toml:/etc/tapio/tapio.toml:ro" -v "$work/data:/var/lib/tapio" \
    "$AGENT_IMAGE" --config /etc/tapio/tapio.toml --sink stdout --log-format json \
    --observer network --observer container >/dev/null
}

# A connect to a loopback port that nobody listens on, from the host.
refused_port() {
  python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()  # nothing listens there: connect gets RST -> ECONNREFUSED
print(port)
EOF
}
refuse() {
  python3 -c 'import socket, sys
try: socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
except ConnectionRefusedError: pass' "$1"
}

# occurrence LOGFILE TYPE KEY=VALUE...: the occurrence of TYPE whose data has all KEY=VALUE.
occurrence() {
  python3 - "$@" <<'EOF'
import json, sys
path, kind, *conds = sys.argv[1:]
want = dict(c.split("=", 1) for c in conds)
for line in open(path, errors="replace"):
    try:
        o = json.loads(line)
    except ValueError:
        continue
    if isinstance(o, dict) and o.get("type") == kind:
        data = o.get("data") or {}
        if all(str(data.get(k)) == v for k, v in want.items()):
            print(json.dumps(o))
            sys.exit(0)
sys.exit(1)
EOF
}

# Keep connecting until the agent reports it (its observers attach after start-up).
sees_refused() { # logfile-producer
  local port
  port=$(refused_port)
  refuse "$port"
  "$1" >"$work/agent.log" 2>&1 || true
  occurrence "$work/agent.log" kernel.network.connection_refused "dst_port=$port" >/dev/null
}
podman_logs() { podman logs "$agent" 2>&1; }
# Under a runtime's default profile: either the occurrence, or the loader's refusal.
outcome=""
default_outcome() { # logfile-producer
  if sees_refused "$1"; then
    outcome=allowed
  elif grep -q 'load of [a-z_]*\.bpf\.o failed' "$work/agent.log"; then
    outcome=refused
  else
    return 1
  fi
}

capbnd_of() { # pid
  awk '/^CapBnd:/ {print $2}' "/proc/$1/status"
}

check_agent_caps() { # pid runtime
  local got
  got=$(capbnd_of "$1")
  check "$2: agent's bounding set $got is the DaemonSet's (${caps[*]}) within the host's" \
    test "$got" == "$want_capbnd"
  check "$2: no_new_privs" test "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$1/status")" == 1
}

log "agent under podman's default seccomp profile"
agent="tapio-it-agent-default-$$"
run_agent_podman "$agent"
wait_for default_outcome podman_logs || outcome="neither reported nor refused within ${WAIT}s"
default_podman=$outcome
log "podman default profile: bpf() $outcome"
grep -m1 -o 'load of [a-z_]*\.bpf\.o failed: [^"]*' "$work/agent.log" | sed 's/^/    /' || true
podman rm -f -t 5 "$agent" >/dev/null

log "agent under deploy/seccomp/tapio-agent.json (podman)"
agent="tapio-it-agent-$$"
run_agent_podman "$agent" --security-opt seccomp="$PWD/deploy/seccomp/tapio-agent.json"
agent_pid=$(podman inspect --format '{{.State.Pid}}' "$agent")
check_agent_caps "$agent_pid" podman
if wait_for sees_refused podman_logs; then
  pass "podman + shipped profile: refused connect reported"
else
  tail -20 "$work/agent.log"
  fail "podman + shipped profile: no connection_refused occurrence within ${WAIT}s"
fi
check "the agent has its own cgroup namespace" \
  test "$(readlink "/proc/$agent_pid/ns/cgroup")" != "$(readlink /proc/self/ns/cgroup)"

ctr_stopped() { # id
  "${CTR[@]}" tasks ls | awk -v id="$1" '$1 == id && $3 != "STOPPED" {found = 1} END {exit found}'
}

# ---- containerd --------------------------------------------------------------------------------
mkdir -p "$work/containerd"
cat >"$work/containerd/config.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctd_sock"
[ttrpc]
  address = "$ctd_sock.ttrpc"
[debug]
  address = "$ctd_sock.debug"
EOF
containerd --config "$work/containerd/config.toml" >"$work/containerd.log" 2>&1 &
ctd_pid=$!
wait_for "${CTR[@]}" version >/dev/null 2>&1 || { tail -20 "$work/containerd.log"; log "containerd did not start"; exit 1; }
podman save -q --format docker-archive -o "$work/agent.tar" "$AGENT_IMAGE"
timeout 300 "${CTR[@]}" images import "$work/agent.tar" >/dev/null
ctr_image=$("${CTR[@]}" images ls -q | grep -m1 "tapio/agent:$TAG")
rm -f "$work/agent.tar"
log "containerd up, image $ctr_image imported"

# A workload as kubelet + containerd (cgroupfs driver) lay it out: <kubepods>/<qos>/pod<uid>/<id>.
pod_uid=$(python3 -c 'import uuid; print(uuid.uuid4())')
cid=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
log "workload container $cid (pod $pod_uid) exits with code 3"
# Detached, and deleted only after the check: `ctr run` deletes the task (and with it the
# cgroup) the moment it exits, before anything could look the cgroup up.
"${CTR[@]}" run -d --null-io --cgroup "/$top/kubepods/besteffort/pod$pod_uid/$cid" \
  "$ctr_image" "$cid" /bin/sh -c 'exit 3' >/dev/null
wait_for ctr_stopped "$cid" || fail "the workload container did not stop within ${WAIT}s"
sees_exit() {
  podman_logs >"$work/agent.log" 2>&1 || true
  occurrence "$work/agent.log" kernel.container.abnormal_exit exit_code=3 "container_id=$cid" \
    "pod_uid=$pod_uid" container_runtime=containerd >/dev/null
}
if wait_for sees_exit; then
  pass "the agent (private cgroup namespace) attributes the exit to container $cid"
else
  grep '"exit_code":3,' "$work/agent.log" | grep '"comm":"sh"' | tail -3
  fail "no abnormal_exit with exit_code=3 attributed to container $cid within ${WAIT}s"
fi
status=$(timeout 10 "${CTR[@]}" tasks delete "$cid" 2>&1 || true)
timeout 10 "${CTR[@]}" containers delete "$cid" >/dev/null 2>&1 || true
check "the workload container exited with 3" grep -q "exit code 3\b" <<<"$status"
podman rm -f -t 5 "$agent" >/dev/null

run_agent_ctr() { # id seccomp-args...
  local id=$1
  shift
  # ctr has no "drop all": drop each of containerd's default capabilities, then add ours.
  local cap_args=()
  for c in CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP \
    NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE; do
    cap_args+=(--cap-drop "CAP_$c")
  done
  # containerd, unlike podman, refuses to start a container asking for a capability the host
  # cannot grant: ask for the DaemonSet's set within the host's (want_capbnd).
  for c in "${ctr_caps[@]}"; do cap_args+=(--cap-add "CAP_$c"); done
  "${CTR[@]}" run -d --log-uri "file://$work/$id.log" "${cap_args[@]}" "$@" --read-only \
    --with-ns pid:"/proc/$ctd_pid/ns/pid" \
    --mount type=bind,src=/sys/kernel/btf,dst=/sys/kernel/btf,options=rbind:ro \
    --mount type=bind,src=/sys/kernel/tracing,dst=/sys/kernel/tracing,options=rbind:ro \
    --mount type=bind,src=/sys/fs/cgroup,dst="$HOST_CGROUPFS",options=rbind:ro \
    --env TAPIO_CGROUP_ROOT="$HOST_CGROUPFS" \
    --mount type=bind,src="$work/tapio.toml",dst=/etc/tapio/tapio.toml,options=rbind:ro \
    --mount type=bind,src="$work/data",dst=/var/lib/tapio,options=rbind:rw \
    "$ctr_image" "$id" /opt/tapio/venv/bin/python -m tapio agent --config /etc/tapio/tapio.toml \
    --sink stdout --log-format json --observer network --observer container \
    >/dev/null
}
ctr_stop() { # id
  timeout 10 "${CTR[@]}" tasks kill -s TERM "$1" >/dev/null 2>&1 || true
  wait_for ctr_stopped "$1" || true
  timeout 10 "${CTR[@]}" tasks delete -f "$1" >/dev/null 2>&1 || true
  timeout 10 "${CTR[@]}" containers delete "$1" >/dev/null 2>&1 || true
}

log "agent under containerd's default seccomp profile"
ctr_id="tapio-it-agent-default"
run_agent_ctr "$ctr_id" --seccomp
ctr_logs() { cat "$work/$ctr_id.log"; }
outcome=""
wait_for default_outcome ctr_logs || outcome="neither reported nor refused within ${WAIT}s"
default_containerd=$outcome
log "containerd default profile: bpf() $outcome"
grep -m1 -o 'load of [a-z_]*\.bpf\.o failed: [^"]*' "$work/agent.log" | sed 's/^/    /' || true
ctr_stop "$ctr_id"

log "agent under deploy/seccomp/tapio-agent.json (containerd)"
ctr_id="tapio-it-agent"
run_agent_ctr "$ctr_id" --seccomp --seccomp-profile "$PWD/deploy/seccomp/tapio-agent.json"
ctr_pid=$("${CTR[@]}" tasks ls | awk -v id="$ctr_id" '$1 == id {print $2}')
check_agent_caps "$ctr_pid" containerd
if wait_for sees_refused ctr_logs; then
  pass "containerd + shipped profile: refused connect reported"
else
  tail -20 "$work/agent.log"
  fail "containerd + shipped profile: no connection_refused occurrence within ${WAIT}s"
fi
ctr_stop "$ctr_id"

# ---- the controller --------------------------------------------------------------------------
log "controller as uid 65532, read-only root"
mkdir -p "$work/profile"
cp deploy/kubernetes/profile.yaml "$work/profile/profile.yaml"
controller="tapio-it-controller-$$"
"${PODMAN[@]}" run -d --name "$controller" --label tapio-image-test="$$" "${LIMITS[@]}" \
  --cap-drop all --security-opt no-new-privileges --read-only --network none \
  -v "$work/profile:/etc/tapio:ro" "$CONTROLLER_IMAGE" >/dev/null
healthz() {
  podman exec "$controller" /opt/tapio/venv/bin/python -c '
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:8080/healthz", timeout=2) as r:
    sys.exit(r.status != 200)' >/dev/null 2>&1
}
if wait_for healthz; then
  pass "controller answers /healthz"
else
  podman logs "$controller" 2>&1 | tail -20
  fail "controller: no 200 on /healthz within ${WAIT}s"
fi
cpid=$(podman inspect --format '{{.State.Pid}}' "$controller")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$cpid/status")
check "controller runs as uid 65532 (uids: $uids)" test "$uids" == "65532 65532 65532 65532"
check "controller holds no capability" \
  test "$(awk '/^CapEff:/ {print $2}' "/proc/$cpid/status")" == 0000000000000000
check "controller's root filesystem is read-only" \
  test "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$controller")" == true

# ---- sizes -----------------------------------------------------------------------------------
mib() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f", $1 / 1048576}'; }
agent_mib=$(mib "$AGENT_IMAGE")
controller_mib=$(mib "$CONTROLLER_IMAGE")
log "image sizes: agent ${agent_mib} MiB, controller ${controller_mib} MiB (agent limit ${AGENT_MAX_MIB} MiB)"
check "agent image ${agent_mib} MiB <= ${AGENT_MAX_MIB} MiB" \
  awk -v s="$agent_mib" -v m="$AGENT_MAX_MIB" 'BEGIN {exit !(s <= m)}'

log "default seccomp profiles: podman: bpf() $default_podman; containerd: bpf() $default_containerd"
log "took $((SECONDS - t0)) s"
echo "image-test: $passed passed, $failed failed"
((failed == 0))
