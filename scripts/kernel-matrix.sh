#!/usr/bin/env bash
# The kernel matrix: run Tapio's kernel end-to-end tests on the kernels production nodes run.
#   scripts/kernel-matrix.sh [5.10|6.1|6.12|host|all]...      (default: all)
#
# 5.10, 6.1 and 6.12 are Debian's generic kernels (bullseye, bookworm, trixie), fetched once into
# a cache (scripts/kmatrix/fetch-kernel.sh) and booted with virtme-ng under QEMU/TCG, sharing
# this machine's root read-only, so the guest runs this very checkout and its .venv. Each guest
# is pure cgroup v2, as Kubernetes nodes are. "host" runs the same tests on the running kernel.
# Every test that would skip fails (CI=true). Prints one summary line per kernel with its
# duration and exits non-zero when any kernel failed.
#
# Environment:
#   TAPIO_KERNEL_CACHE    kernel cache (default /var/cache/tapio/kernels)
#   TAPIO_MATRIX_OUT      results: <out>/<kernel>/{console.log,junit.xml,rc} (default .matrix/)
#   TAPIO_MATRIX_TIMEOUT  seconds one kernel's test run may take (default 1100)
#   TAPIO_MATRIX_TESTS    pytest node ids to run instead of the default subset
#   TAPIO_MATRIX_KNOWN_FAILURES  list of "<kernel> <test>  # why" failures that do not fail the
#                         matrix (default scripts/kmatrix/known-failures); each is printed
#   TAPIO_MATRIX_TIME_SCALE  factor for the tests' waits inside a guest (default 4)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() { echo "usage: scripts/kernel-matrix.sh [5.10|6.1|6.12|host|all]..." >&2; exit 2; }
kernels=()
for a in "${@:-all}"; do
  case "$a" in
    all) kernels+=(5.10 6.1 6.12 host) ;;
    5.10|6.1|6.12|host) kernels+=("$a") ;;
    -h|--help) usage ;;
    *) echo "kernel-matrix.sh: unknown kernel '$a'" >&2; usage ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "kernel-matrix.sh: run as root (it loads BPF programs and boots kernels)" >&2
  exit 1
fi

out=${TAPIO_MATRIX_OUT:-$repo/.matrix}
budget=${TAPIO_MATRIX_TIMEOUT:-1100}
known=${TAPIO_MATRIX_KNOWN_FAILURES:-$repo/scripts/kmatrix/known-failures}
# How much longer the tests' waits may take in a guest (TCG runs 10-30x slower than the host).
scale=${TAPIO_MATRIX_TIME_SCALE:-4}
mkdir -p "$out"

# One test per anomaly type, sized for TCG: refused (v4 and v6) and timed-out connects,
# retransmit spike, RTT degradation; DNS errors, slow answers and timeouts (with the sender where
# the kernel lets cgroup_skb see it); OOM kill, abnormal exits (threads, signals) and the
# Kubernetes cgroup attribution; read errors and latency spikes on the FUSE-backed loop device;
# memory pressure and CPU stall (with the PMU degradation); the agent with all four observers;
# which build of the connect-record and block programs each kernel loads.
default_tests=(
  tests/kernel/test_matrix_kernel.py
  "tests/kernel/test_network_kernel.py::test_refused_ipv4_and_ipv6_exactly_one_each"
  "tests/kernel/test_network_kernel.py::test_syn_timeout_gives_exactly_one_timeout_with_the_caller"
  "tests/kernel/test_network_kernel.py::test_retransmit_spike_is_windowed_and_clean_transfer_is_silent"
  "tests/kernel/test_network_kernel.py::test_rtt_degradation_reports_baseline_and_current"
  "tests/kernel/test_network_slots_kernel.py::test_the_slot_programs_are_the_ones_loaded"
  "tests/kernel/test_dns_kernel.py::test_each_failure_exactly_once_with_its_sender"
  "tests/kernel/test_container_kernel.py::test_oom_kill_reports_the_victim_its_usage_cgroup_and_limit"
  "tests/kernel/test_container_kernel.py::test_abnormal_exits_once_per_process_with_code_signal_and_ignore_lists"
  "tests/kernel/test_container_kernel.py::test_kubernetes_layouts_are_attributed_and_scope_filters_host_processes"
  "tests/kernel/test_storage_kernel.py::test_read_errors_are_reported_with_the_reader_and_sectors"
  "tests/kernel/test_storage_kernel.py::test_slow_reads_are_latency_spikes_by_threshold"
  "tests/kernel/test_storage_kernel.py::test_a_full_slot_set_evicts_its_oldest_request_and_counts_it"
  "tests/kernel/test_storage_kernel.py::test_the_tp_btf_block_programs_are_the_ones_loaded"
  "tests/kernel/test_node_kernel.py::test_memory_pressure_in_a_limited_cgroup"
  "tests/kernel/test_node_kernel.py::test_cpu_stall_throttling_runq_latency_and_no_pmu"
)
if [[ -n ${TAPIO_MATRIX_TESTS:-} ]]; then
  read -r -a tests <<<"$TAPIO_MATRIX_TESTS"
else
  tests=("${default_tests[@]}")
fi

# --- tools ----------------------------------------------------------------------------------
need_vm=0
for k in "${kernels[@]}"; do [[ $k != host ]] && need_vm=1; done
if [[ ! -x .venv/bin/python ]]; then
  scripts/setup.sh --test || exit 1
else
  # The guests run this checkout as it is: its BPF objects and the generated libbpf binding
  # must match the sources, also in a checkout whose .venv predates the last change to them.
  .venv/bin/python build_bpf.py >/dev/null || exit 1
fi
if ((need_vm)); then
  bash scripts/kmatrix/tools.sh || exit 1
  export PATH="$repo/.venv-vng/bin:$PATH"
fi

# --- run ------------------------------------------------------------------------------------
declare -A result detail took fetched rebooted
overall=0
# junit.xml + the known-failure list -> one line "STATUS detail"; STATUS is PASS, KNOWN (only
# listed failures) or FAIL (anything else, or no report at all).
summarize() {
  .venv/bin/python - "$1" "$2" "$known" <<'PY'
import sys, xml.etree.ElementTree as ET
report, tag, known_file = sys.argv[1:4]
known = {}
for line in open(known_file, encoding="utf-8"):
    line = line.split("#", 1)
    fields = line[0].split()
    if len(fields) == 2:
        known.setdefault(fields[0], {})[fields[1]] = line[1].strip() if len(line) > 1 else ""
try:
    root = ET.parse(report).getroot()
except (OSError, ET.ParseError):
    print("FAIL no test report"); raise SystemExit
s = root if root.tag == "testsuite" else root.find("testsuite")
cases = list(s.iter("testcase"))
def name(c):  # a parametrized test is listed once, by its function name
    return c.get("name").split("[", 1)[0]
bad = sorted({name(c) for c in cases if c.find("failure") is not None or c.find("error") is not None})
skipped = [name(c) for c in cases if c.find("skipped") is not None]
mine = known.get(tag, {})
unexpected = [n for n in bad if n not in mine]
fixed = [n for n in mine if n not in bad and any(name(c) == n for c in cases)]
nbad = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
line = f"{len(cases) - nbad - len(skipped)} passed, {nbad} failed, {len(skipped)} skipped"
if unexpected or skipped or not cases:
    status = "FAIL"
elif bad:
    status = "KNOWN"
else:
    status = "PASS"
if unexpected:
    line += f"; FAILED: {', '.join(unexpected)}"
if bad and not unexpected:
    line += "; known failures: " + "; ".join(f"{n} ({mine[n]})" for n in bad)
if fixed:
    line += f"; listed as failing but passed now (drop from known-failures): {', '.join(fixed)}"
print(status, line)
PY
}

# One boot of a guest. TCG (nested KVM hangs on these machines); -v, or the guest's output is
# lost; psi=1 because some Debian kernels build PSI default-off and Kubernetes nodes switch it on;
# the kernel's directory is exported read-only because the guest hides the host's /var/cache.
# Under TCG a guest can fail while the kernel live-patches its own text (a static key flipped
# when a tracepoint program attaches or detaches, through a temporary int3 on the patched
# instruction): either one vCPU spins on the patching breakpoint, RCU starves and the watchdog
# prints "soft lockup", or a vCPU still executes the breakpoint after the patch completed and
# the kernel dies with "Oops: int3". That is the emulator's cross-modifying code, not Tapio and
# not the guest kernel, and it would otherwise hold the run until the budget expires or end it
# with no report: the console is watched, the guest is stopped at the first such report, and
# the status is 86 so the caller boots it again. Any other oops is not excused: it fails.
emulator_fault() {  # the console's first emulator-fault line, or nothing
  grep -m1 -E 'soft lockup - CPU#[0-9]* stuck for|Oops: int3' "$1" 2>/dev/null
}
# The kernel's own report of a crash (oops, BUG, panic, lockup) with what follows it: the
# console's kernel lines are otherwise left out of the failure summary.
kernel_report() {
  grep -m1 -A 30 -E 'Oops: |BUG: |Kernel panic|soft lockup - CPU|WARNING: CPU: ' "$1" 2>/dev/null \
    | grep -E 'Oops|BUG|panic|lockup|WARNING|RIP:|Comm:|Call Trace|\+0x[0-9a-f]+/0x[0-9a-f]+' \
    | head -n 25
}
boot_guest() {
  local tag=$1 dir=$2 kdir=$3 vmlinuz=$4 pid rc fault=0
  : >"$dir/console.log"  # no earlier run's lines for the watch below
  timeout --signal=TERM --kill-after=30 $((budget + 240)) \
    vng -r "$vmlinuz" --disable-kvm --force-9p -v --cpus 2 --memory 2G \
      --append psi=1 --rodir="$kdir" --rwdir="$dir" --rodir="$out/.runtime" \
      --exec "TAPIO_TEST_TIME_SCALE=$scale TAPIO_FUSE_HELPER=$out/.runtime/fuse_helper $repo/scripts/kmatrix/guest.sh $dir $out/.runtime/runtime $budget" \
      </dev/null >"$dir/console.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [[ -n $(emulator_fault "$dir/console.log") ]]; then
      fault=1
      kill -TERM "$pid" 2>/dev/null
      break
    fi
    sleep 5
  done
  wait "$pid"
  rc=$?
  ((fault)) && return 86
  return "$rc"
}

run_vm() {
  local tag=$1 dir=$2 t0 kdir vmlinuz rc
  t0=$(date +%s)
  if ! kdir=$(bash scripts/kmatrix/fetch-kernel.sh "$tag" 2>"$dir/fetch.log"); then
    cat "$dir/fetch.log" >&2
    result[$tag]=FAIL; detail[$tag]="kernel fetch failed (see $dir/fetch.log)"; return 1
  fi
  fetched[$tag]=$(( $(date +%s) - t0 ))
  vmlinuz=$(readlink -f "$kdir/vmlinuz")  # the real path: virtme-ng finds lib/modules beside it
  rm -f "$dir/rc" "$dir/junit.xml" "$dir/status.json"
  # The test list goes in a file: the kernel command line (which carries --exec) is short.
  printf '%s\n' "${tests[@]}" >"$dir/tests"
  t0=$(date +%s)
  boot_guest "$tag" "$dir" "$kdir" "$vmlinuz"
  rc=$?
  if ((rc == 86)); then
    # The emulator, not the kernel under test: see boot_guest. One fresh boot, said in the
    # summary, with the kernel's report so a reader can check where it hit.
    mv "$dir/console.log" "$dir/console.fault.log"
    echo "== kernel-matrix: $tag: the emulated guest failed while patching kernel text ($(emulator_fault "$dir/console.fault.log" | sed 's/^\[ *[0-9.]*\] //')); console.fault.log; booting it once more" >&2
    kernel_report "$dir/console.fault.log" | sed 's/^/   | /' >&2
    rebooted[$tag]=1
    rm -f "$dir/rc" "$dir/junit.xml" "$dir/status.json"
    boot_guest "$tag" "$dir" "$kdir" "$vmlinuz"
    rc=$?
  fi
  took[$tag]=$(( $(date +%s) - t0 ))
  if ((rc == 86)); then
    :  # the emulator failed the second boot too: no report to read
  elif [[ -s $dir/rc ]]; then
    rc=$(<"$dir/rc")
  elif ((rc == 124)); then
    rc=124
  else
    rc=125
  fi
  conclude "$tag" "$dir" "$rc"
}

# The kernel's verdict from pytest's exit status and its report: a failing run passes the
# matrix only when every failure is a listed known one.
conclude() {
  local tag=$1 dir=$2 rc=$3 line
  line=$(summarize "$dir/junit.xml" "$tag")
  result[$tag]=${line%% *}
  detail[$tag]=${line#* }
  case $rc in
    0|1) ;;
    86) result[$tag]=FAIL; detail[$tag]="the emulated guest failed while patching kernel text in both boots (console.fault.log, console.log); ${detail[$tag]}" ;;
    124) result[$tag]=FAIL; detail[$tag]="timed out or guest setup failed; ${detail[$tag]}" ;;
    125) result[$tag]=FAIL; detail[$tag]="the guest never finished (console.log); ${detail[$tag]}" ;;
    *) result[$tag]=FAIL; detail[$tag]="pytest exit $rc; ${detail[$tag]}" ;;
  esac
  [[ -n ${rebooted[$tag]:-} ]] && detail[$tag]+="; booted twice (emulator fault in the first boot, console.fault.log)"
  [[ $rc -eq 0 && ${result[$tag]} == PASS ]] && return 0
  [[ ${result[$tag]} == KNOWN ]]
}

run_host() {
  local dir=$1 t0 rc
  t0=$(date +%s)
  # Host runs load BPF into the shared kernel: hold the kernel-test lock like every other.
  CI=true flock /tmp/tapio-kernel.lock timeout --signal=TERM --kill-after=30 "$budget" \
    .venv/bin/python -m pytest -p no:cacheprovider -q -rA --durations=0 \
      --junitxml="$dir/junit.xml" "${tests[@]}" </dev/null >"$dir/console.log" 2>&1
  rc=$?
  took[host]=$(( $(date +%s) - t0 ))
  conclude host "$dir" "$rc"
}

# The guest reads the host's files over 9p without a page cache, and under TCG every file
# access is a slow round trip: one Python start costs ~30 s that way. So the interpreter's
# library, the venv's site-packages (less the lint and schema tools the kernel tests never load)
# and the checkout's src/ and tests/ go to the guest as one archive, unpacked into RAM and
# mounted over the same paths (scripts/kmatrix/guest.sh).
pack_runtime() {
  local py_lib site
  py_lib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$out/.runtime"
  tar -cf "$out/.runtime/runtime.tar" -P \
    --exclude='__pycache__/*.opt-?.pyc' --exclude="$py_lib/test" --exclude="$py_lib/idlelib" \
    --exclude="$py_lib/tkinter" --exclude="$py_lib/ensurepip" --exclude="$py_lib/lib2to3" \
    --exclude="$site/kubernetes_validate*" --exclude="$site/*__mypyc*" --exclude="$site/mypy" \
    --exclude="$site/mypyc" --exclude="$site/pip" --exclude="$site/pip-*" \
    --exclude="$site/setuptools" --exclude="$site/pkg_resources" --exclude="$site/ruff*" \
    --exclude="$site/cryptography" --exclude="$site/pydantic*" \
    --exclude="$site/jsonschema*" --exclude="$site/referencing" --exclude="$site/rpds" \
    --exclude="$site/mcp" --exclude="$site/mcp_types" --exclude="$site/starlette" \
    --exclude="$site/sse_starlette" --exclude="$site/uvicorn" --exclude="$site/trustme" \
    --exclude="$site/*-stubs" --exclude="$site/*.dist-info/RECORD" \
    "$py_lib" "$site" "$repo/src" "$repo/tests"
  # The FUSE helper of the storage tests, compiled here (a compiler under TCG takes minutes).
  gcc -O2 -Wall -o "$out/.runtime/fuse_helper" tests/kernel/fuse_helper.c \
    $(pkg-config --cflags --libs fuse3)
  printf '%s\n' "$py_lib" "$site" "$repo/src" "$repo/tests" >"$out/.runtime/runtime.paths"
}
((need_vm)) && pack_runtime

matrix_t0=$(date +%s)
for k in "${kernels[@]}"; do
  dir="$out/$k"
  mkdir -p "$dir"
  echo "== kernel-matrix: $k" >&2
  if [[ $k == host ]]; then run_host "$dir"; else run_vm "$k" "$dir"; fi || overall=1
  echo "== kernel-matrix: $k ${result[$k]} in ${took[$k]:-0} s: ${detail[$k]}" >&2
  if [[ ${result[$k]} == FAIL ]]; then
    echo "-- last lines of $dir/console.log:" >&2
    grep -v '^\[ *[0-9.]*\]' "$dir/console.log" 2>/dev/null | tail -n 40 >&2
    report=$(kernel_report "$dir/console.log")
    if [[ -n $report ]]; then
      echo "-- the guest kernel's report in $dir/console.log:" >&2
      printf '%s\n' "$report" >&2
    fi
  fi
done

echo
echo "kernel matrix (results in $out):"
printf '  %-6s %-20s %-5s %8s %8s  %s\n' kernel release result fetch run tests
for k in "${kernels[@]}"; do
  if [[ $k == host ]]; then
    rel="$(uname -r) (hybrid)"
    [[ -f /sys/fs/cgroup/cgroup.controllers ]] && rel="$(uname -r) (v2)"
  else
    rel=$(cat "${TAPIO_KERNEL_CACHE:-/var/cache/tapio/kernels}/$k/release" 2>/dev/null || echo "?")
  fi
  printf '  %-6s %-20s %-5s %7ss %7ss  %s\n' "$k" "$rel" "${result[$k]}" \
    "${fetched[$k]:--}" "${took[$k]:-0}" "${detail[$k]}"
done
echo "  total $(( $(date +%s) - matrix_t0 )) s"
exit "$overall"
