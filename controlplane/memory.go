package controlplane

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// StoreSessionMemory is what the soft memory limit allows one stored
// session: about twice what a restore holds for it at its peak (the
// snapshot's entry, the index's, the session to write: some 400 bytes), so
// that the collector has room to work.
const StoreSessionMemory = 768

// StoreMemoryBound is the soft memory limit of a daemon whose MemoryBound
// is bound and whose store's index holds sessions: bound, or, when the
// index needs more, the process's base and StoreSessionMemory a session,
// but never more than seven eighths of ceiling, the hard limit of the
// daemon's cgroup (0 for none), so that the collector works harder before
// the kernel kills. Below what the index needs the collector runs without
// pause: a restore of a million sessions from three members on loopback
// took 6.8 s of CPU against the 196 MiB of the default bound, 3.4 s
// against this (BenchmarkStoreRestore/etcd, in one run).
func StoreMemoryBound(bound int64, sessions int, ceiling int64) int64 {
	limit := max(bound, memoryBase+int64(sessions)*StoreSessionMemory)
	if ceiling > 0 {
		limit = min(limit, max(bound, ceiling/8*7))
	}
	return limit
}

// cgroupMemoryMax reads the memory.max of this process's cgroup (the
// unified hierarchy: the "0::PATH" line of cgroupFile, under root); false
// if there is none or it is "max".
func cgroupMemoryMax(cgroupFile, root string) (int64, bool) {
	b, err := os.ReadFile(cgroupFile)
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		path, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		v, err := os.ReadFile(filepath.Join(root, path, "memory.max"))
		if err != nil {
			return 0, false
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
		return n, err == nil && n > 0
	}
	return 0, false
}
