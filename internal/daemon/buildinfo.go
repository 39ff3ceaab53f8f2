package daemon

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"sync"

	"github.com/cilium/ebpf/asm"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// BuildInfo is aegis_build_info{version, program_tag}, always 1: the
// binary's version and the kernel tag of the XDP program compiled into it.
//
// The tag is computed from the embedded object, not read from the kernel:
// the kernel hands out a program's tag only through a descriptor of the
// program or of its link (or a lookup by id, which needs CAP_SYS_ADMIN),
// and the pinned program and links are root's alone on purpose: a
// descriptor of a link can detach the filter. It is the tag aegis-loader
// status and bpftool print for this build once loaded, so an operator can
// tell whether the daemons and the attached program are one build
// (aegis-loader status says "current" for the loader's own build).
func BuildInfo() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "aegis_build_info",
		Help:        "Always 1; version is the build, program_tag the kernel tag of the XDP program compiled into it.",
		ConstLabels: prometheus.Labels{"version": cli.Version(), "program_tag": ProgramTag()},
	}, func() float64 { return 1 })
}

var (
	tagOnce sync.Once
	tagVal  string
)

// ProgramTag returns the kernel tag of the embedded XDP program as this
// kernel computes it, or "unknown" if the object does not parse.
func ProgramTag() string {
	tagOnce.Do(func() {
		tagVal = "unknown"
		spec, err := state.Spec()
		if err != nil {
			return
		}
		ps, err := state.ProgramSpec(spec)
		if err != nil {
			return
		}
		if t, err := programTag(ps.Instructions, spec.ByteOrder, tagHash(kernelRelease())); err == nil {
			tagVal = t
		}
	})
	return tagVal
}

// tagHash is the hash bpf_prog_calc_tag uses: SHA-256 from Linux 6.18,
// SHA-1 before. cilium/ebpf can only test a tag against both
// (Instructions.HasTag); a label needs the one the kernel prints.
func tagHash(major, minor int) func() hash.Hash {
	if major > 6 || (major == 6 && minor >= 18) {
		return sha256.New
	}
	return sha1.New
}

// programTag mirrors bpf_prog_calc_tag: the hash of the instructions with
// the constant of each map load zeroed (it holds a descriptor, which
// differs from load to load), cut to the kernel's 8 bytes. cilium/ebpf's
// own hash is unexported.
func programTag(insns asm.Instructions, bo binary.ByteOrder, newHash func() hash.Hash) (string, error) {
	h := newHash()
	for i, ins := range insns {
		if ins.IsLoadFromMap() {
			ins.Constant = 0
		}
		if _, err := ins.Marshal(h, bo); err != nil {
			return "", fmt.Errorf("hash instruction %d: %w", i, err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)[:unix.BPF_TAG_SIZE]), nil
}

// kernelRelease returns the running kernel's major and minor version.
func kernelRelease() (major, minor int) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return 0, 0
	}
	rel := string(bytes.TrimRight(u.Release[:], "\x00"))
	_, _ = fmt.Sscanf(rel, "%d.%d", &major, &minor)
	return major, minor
}
