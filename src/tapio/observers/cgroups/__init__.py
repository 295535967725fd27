"""The one cgroup model: where the hierarchies are, cgroup id ↔ path, and what a path says.

Every observer that names a cgroup (container, storage, node) goes through this package:

* :class:`CgroupRoots` (:mod:`.roots`) is where the cgroup2 tree ("unified") and the v1
  ``memory`` and ``cpu`` controllers live. On a pure cgroup2 host (what production nodes run)
  all three are the one cgroup2 mount; on a hybrid host the v1 controllers have their own
  trees. :func:`discover_roots` reads them from ``/proc/self/mountinfo`` or, when a host
  cgroupfs root is configured (an agent in a pod sees the host's tree at e.g.
  ``/host/sys/fs/cgroup``; ``$TAPIO_CGROUP_ROOT``), probes that directory.
* :class:`CgroupResolver` (:mod:`.resolver`) maps ``(hierarchy, id)`` to a path. The id the
  kernel reports (``bpf_get_current_cgroup_id()``, a memcg's ``kn->id``) is the inode number of
  the cgroup's directory, so a walk of the *host's* tree finds it whatever cgroup namespace the
  agent runs in; a ``/proc/<pid>/cgroup`` path, by contrast, is relative to the reader's
  namespace. Ids are per hierarchy (the same number can name different cgroups in two trees).
  One walk remembers every directory it saw in a bounded LRU; a miss is remembered for a short
  time in a bounded negative cache. A cgroup that is gone is unknown (``None``), never guessed.
  The walk is blocking I/O: on the agent's event loop it only ever runs in a worker thread
  (:meth:`CgroupResolver.resolve`), one walk at a time, and every miss is counted
  (``tapio_cgroup_lookups_total{result="miss"}``).
* :class:`CgroupWatcher` (:mod:`.watch`) learns cgroups when they are made (inotify) and turns
  removed ones into tombstones that stay resolvable for a few minutes, so the evidence of a
  workload whose runtime removes its cgroup at exit keeps its attribution. The periodic
  re-index stays as the safety net for what the bounded watch does not see.
* :class:`ByCgroupId` / :class:`ByCgroupPath` (:mod:`.facts`) are what an observer asks the
  agent's enrichment stage to add, and :func:`cgroup_facts` the one rule for which of a task's
  cgroups describes it best.
* :func:`parse_container` (:mod:`.containers`) turns a path into
  ``(container_id, runtime, pod_uid)``:

  - containerd ``cri-containerd-<64hex>.scope`` (systemd driver) or a bare ``<64hex>``
    directory below ``kubepods`` (cgroupfs driver; containerd is the CRI runtime using it);
  - cri-o ``crio-<64hex>.scope`` (or ``crio-<64hex>`` with the cgroupfs driver);
  - docker ``docker-<64hex>.scope`` or ``/docker/<64hex>``;
  - a systemd unit ``<name>.service`` / ``<name>.scope`` → runtime ``systemd``, id = unit name;
  - the pod UID from ``pod<uid>`` (cgroupfs) or ``kubepods[-<qos>]-pod<uid_underscored>.slice``
    (systemd), for the burstable, besteffort and guaranteed (no QoS directory) classes.

No Kubernetes API here: pod names and namespaces are the controller's job.
"""

from tapio.observers.cgroups.containers import NO_ATTRIBUTION, Attribution, parse_container
from tapio.observers.cgroups.facts import (
    ID_KEYS,
    ByCgroupId,
    ByCgroupPath,
    Enrichment,
    cgroup_facts,
    memo_key,
)
from tapio.observers.cgroups.resolver import MISS, CgroupResolver, Miss
from tapio.observers.cgroups.roots import (
    DEFAULT_ROOT,
    HIERARCHIES,
    MAX_WALK,
    ROOT_ENV,
    U64_MAX,
    CgroupRoots,
    discover_roots,
    parse_proc_cgroup,
    roots_at,
    roots_from_mountinfo,
    scan_tree,
    walk_cgroups,
)

__all__ = [
    "DEFAULT_ROOT",
    "HIERARCHIES",
    "ID_KEYS",
    "MAX_WALK",
    "MISS",
    "NO_ATTRIBUTION",
    "ROOT_ENV",
    "U64_MAX",
    "Attribution",
    "ByCgroupId",
    "ByCgroupPath",
    "CgroupResolver",
    "CgroupRoots",
    "Enrichment",
    "Miss",
    "cgroup_facts",
    "discover_roots",
    "memo_key",
    "parse_container",
    "parse_proc_cgroup",
    "roots_at",
    "roots_from_mountinfo",
    "scan_tree",
    "walk_cgroups",
]
