package e2e

import (
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// loaderCaps is the loader unit's capability bounding set: the documented
// CAP_BPF, CAP_NET_ADMIN and CAP_CHOWN, plus CAP_PERFMON, without which the
// verifier's Spectre v1 hardening refuses packet access at a variable
// offset (IPv4 options, VLAN tags, IPv6 extension headers).
const loaderCaps = "--bounding-set=-all,+bpf,+perfmon,+net_admin,+chown"

// specCaps runs a binary as root with only the loader unit's capabilities.
func (g *gateway) specCaps(binary string, args ...string) (string, error) {
	full := append([]string{loaderCaps, "--inh-caps=-all", binary}, args...)
	full = append(full, "--pin-path", g.pin)
	out, err := g.Gateway.Command("setpriv", full...).CombinedOutput()
	return string(out), err
}

// The loader's whole lifecycle works with only the capabilities of its
// unit: in particular no CAP_SYS_ADMIN (no object-by-id lookups).
func TestLoaderRunsWithItsUnitCapabilities(t *testing.T) {
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	args := []string{"load", "-i", tu.PublicIface, "-c", tu.ControllerV4.String(), "--group", "root"}
	steps := []struct {
		binary string
		args   []string
		want   string
	}{
		{bin("aegis-loader"), args, "attached " + tu.PublicIface},
		{bin("aegis-loader"), args, "already loaded"},
		{bin("aegis-loader-next"), args, "upgraded " + tu.PublicIface},
		{bin("aegis-loader"), []string{"status"}, "sessions_v4"},
	}
	for _, s := range steps {
		out, err := g.specCaps(s.binary, s.args...)
		if err != nil || !strings.Contains(out, s.want) || strings.Contains(out, "locality program not pinned") {
			t.Fatalf("%s %s: %v\n%s", s.binary, strings.Join(s.args, " "), err, out)
		}
	}
	if _, err := os.Stat(state.LocalityProgramPath(g.pin)); err != nil {
		t.Fatalf("locality program: %v", err)
	}

	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	g.Serve(t, svc)
	g.grant(state.Session{Key: tcpKey(tu.ClientV4, tu.ServiceAV4, 8080), User: "alice", IdleTimeout: time.Minute})
	g.expectPass("TCP through the program loaded without CAP_SYS_ADMIN", bpf.ReasonSession, func() error {
		return g.TCP(tu.ClientV4, svc, probeTimeout)
	})

	if out, err := g.specCaps(bin("aegis-loader"), "unload"); err != nil || !strings.Contains(out, "unloaded") {
		t.Fatalf("unload: %v\n%s", err, out)
	}
	// Missing privileges get one clear line.
	for _, c := range []struct{ caps, want string }{
		{"--bounding-set=-all,+perfmon,+net_admin,+chown", "operation not permitted"},
		{"--bounding-set=-all,+bpf,+net_admin,+chown", "needs CAP_BPF, CAP_PERFMON"},
	} {
		cmd := append([]string{c.caps, "--inh-caps=-all", bin("aegis-loader")}, args...)
		out, err := g.Gateway.Command("setpriv", append(cmd, "--pin-path", g.pin)...).CombinedOutput()
		var ee *exec.ExitError
		if err == nil || !errAs(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("load with %s: %v\n%s", c.caps, err, out)
		}
		last := strings.TrimSpace(string(out))
		last = last[strings.LastIndex(last, "\n")+1:]
		if !strings.HasPrefix(last, "aegis-loader: ") || !strings.Contains(last, c.want) {
			t.Fatalf("load with %s: unclear error %q", c.caps, last)
		}
	}
}
