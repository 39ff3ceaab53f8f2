package controlplane

import (
	"os"
	"path/filepath"
	"testing"
)

// The cgroup's hard limit is read from the unified hierarchy, and there
// is none when the cgroup has "max", or no such line or file.
func TestCgroupMemoryMax(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root := filepath.Join(dir, "fs")
	write("fs/system.slice/a.service/memory.max", "268435456\n")
	write("fs/system.slice/b.service/memory.max", "max\n")
	for _, c := range []struct {
		cgroup string
		want   int64
		ok     bool
	}{
		{"0::/system.slice/a.service\n", 256 << 20, true},
		{"4:memory:/x\n0::/system.slice/a.service\n", 256 << 20, true},
		{"0::/system.slice/b.service\n", 0, false},
		{"0::/system.slice/c.service\n", 0, false},
		{"4:memory:/system.slice/a.service\n", 0, false},
	} {
		got, ok := cgroupMemoryMax(write("cgroup", c.cgroup), root)
		if got != c.want || ok != c.ok {
			t.Errorf("%q: %d, %v; want %d, %v", c.cgroup, got, ok, c.want, c.ok)
		}
	}
	if _, ok := cgroupMemoryMax(filepath.Join(dir, "none"), root); ok {
		t.Error("a limit without a cgroup file")
	}
}
