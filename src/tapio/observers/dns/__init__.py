"""DNS evidence of the network observer: failed, refused, slow and unanswered lookups.

The kernel part lives in bpf/network.bpf.c (cgroup_skb programs at the cgroup v2 root);
:mod:`.record` mirrors its records, :mod:`.classify` formats them, :mod:`.flood` folds identical
failures into one occurrence with a count and :mod:`.tracker` drains, sweeps and emits.
"""
