package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// journalEntries runs journalctl -o json in the container and decodes one
// entry per line.
func (c *container) journalEntries(args ...string) []map[string]any {
	c.t.Helper()
	out := c.run(append([]string{"journalctl", "--no-pager", "-o", "json"}, args...)...)
	var entries []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" || strings.HasPrefix(line, "-- ") {
			continue
		}
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			c.t.Fatalf("journalctl -o json: %v: %q", err, line)
		}
		entries = append(entries, e)
	}
	return entries
}

func field(e map[string]any, name string) string { s, _ := e[name].(string); return s }

// Under real systemd the daemons log natively to the journal (the
// default --log-format auto): journalctl -p err shows the control plane's
// errors and nothing else, the info lines are there with -p info, and an
// audit line is found by its fields. Written as JSON on stderr, as before,
// every line was one priority (info) and -p err showed nothing.
func TestSystemdJournal(t *testing.T) {
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	c := bootContainer(t, g)

	c.run("env", "PATH=/usr/local/go/bin:/usr/bin:/bin", "GOFLAGS=-buildvcs=false", "make", "-C", "/opt/aegis", "install")
	c.run("systemd-sysusers")
	env := fmt.Sprintf("AEGIS_IFACE=%s\nAEGIS_IP=%s\nAEGIS_PIN_PATH=%s\nAEGIS_ALLOWED_CLIENT_NAME=aegis-controller\n",
		tu.PublicIface, tu.ControllerV4, g.pin)
	if err := os.WriteFile(filepath.Join(c.root, "etc/aegis/aegis.env"), []byte(env), 0o640); err != nil {
		t.Fatal(err)
	}
	c.run("/usr/local/bin/aegisctl", "certs", "init")
	c.run("/usr/local/bin/aegisctl", "certs", "server", "--ip", "198.51.100.1")
	c.run("/usr/local/bin/aegisctl", "certs", "client", "aegis-controller")
	tlsDir := filepath.Join(c.root, "etc/aegis/tls")

	// The server certificate from a file the test can break, so that a
	// SIGHUP reload fails and logs an error (the unit's credential copy
	// is read-only).
	cert, err := os.ReadFile(filepath.Join(tlsDir, "server.crt"))
	if err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(c.root, "etc/aegis-journal-test")
	if err := os.MkdirAll(certDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certDir, "server.crt"), cert, 0o644); err != nil {
		t.Fatal(err)
	}
	dropin := filepath.Join(c.root, "etc/systemd/system/aegis-controlplane.service.d")
	if err := os.MkdirAll(dropin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dropin, "cert.conf"), []byte("[Service]\nExecStart=\n"+
		"ExecStart=/usr/local/bin/aegis-controlplane --tls-cert=/etc/aegis-journal-test/server.crt --tls-key=%d/server.key --tls-client-ca=%d/ca.crt\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.run("systemctl", "daemon-reload")
	if out, err := c.cmd("systemctl", "enable", "--now", "aegis-loader.service").CombinedOutput(); err != nil {
		t.Fatalf("systemctl enable --now aegis-loader: %v\n%s", err, out)
	}
	for _, u := range []string{"aegis-controlplane.service", "aegis-reaper.service"} {
		c.waitActive(u, 20*time.Second)
	}

	if err := login(g, controllerClient(t, tlsDir), &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
		DstIp: tu.ServiceAV4.String(), DstPort: 7000, Protocol: agentv1.Protocol_PROTOCOL_UDP}); err != nil {
		t.Fatalf("login: %v\n%s", err, c.out("journalctl", "--no-pager", "-n", "20", "-u", "aegis-controlplane.service"))
	}

	if err := os.WriteFile(filepath.Join(certDir, "server.crt"), []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.run("systemctl", "kill", "-s", "HUP", "--kill-whom=main", "aegis-controlplane.service")

	const unit = "aegis-controlplane.service"
	var errs []map[string]any
	deadline := time.Now().Add(20 * time.Second)
	for {
		errs = c.journalEntries("-u", unit, "-p", "err")
		if len(errs) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(errs) == 0 {
		t.Fatalf("journalctl -p err -u %s shows nothing after a failed reload:\n%s", unit,
			c.out("journalctl", "--no-pager", "-u", unit))
	}
	for _, e := range errs {
		if p := field(e, "PRIORITY"); p > "3" {
			t.Errorf("-p err shows priority %s: %s", p, field(e, "MESSAGE"))
		}
	}
	if m := field(errs[0], "MESSAGE"); !strings.HasPrefix(m, "reload TLS files: keeping the ones loaded before") ||
		field(errs[0], "SYSLOG_IDENTIFIER") != "aegis-controlplane" || field(errs[0], "AEGIS_ERROR") == "" {
		t.Errorf("the error entry: %v", errs[0])
	}
	t.Logf("journalctl -p err -u %s: %d entries, first %q", unit, len(errs), field(errs[0], "MESSAGE"))

	info := c.journalEntries("-u", unit, "-p", "info", "SYSLOG_IDENTIFIER=aegis-controlplane")
	var infoLines, serving int
	for _, e := range info {
		if field(e, "PRIORITY") == "6" {
			infoLines++
		}
		if strings.HasPrefix(field(e, "MESSAGE"), "serving session.SessionManager and aegis.agent.v1.AgentService") {
			serving++
		}
	}
	if infoLines == 0 || serving != 1 {
		t.Errorf("-p info: %d info entries, %d serving lines (want 1)", infoLines, serving)
	}
	t.Logf("journalctl -p info -u %s: %d entries, %d at info", unit, len(info), infoLines)

	// The audit line, found by its fields.
	grants := c.journalEntries("-u", unit, "AEGIS_AUDIT=grant", "AEGIS_USER=alice")
	if len(grants) != 1 {
		t.Fatalf("journalctl AEGIS_AUDIT=grant AEGIS_USER=alice: %d entries, want 1", len(grants))
	}
	for k, want := range map[string]string{"AEGIS_RESULT": "created", "AEGIS_PEER": "aegis-controller", "AEGIS_SRC": tu.ClientV4.String(),
		"AEGIS_DST": tu.ServiceAV4.String(), "AEGIS_DPORT": "7000", "AEGIS_PROTO": "udp", "PRIORITY": "6"} {
		if got := field(grants[0], k); got != want {
			t.Errorf("audit entry %s = %q, want %q", k, got, want)
		}
	}
	if ts, _ := grants[0]["__REALTIME_TIMESTAMP"].(string); len(ts) < 16 {
		t.Errorf("__REALTIME_TIMESTAMP %q: want microseconds", ts)
	}
	// The reaper logs to the journal too.
	if r := c.journalEntries("-u", "aegis-reaper.service", "SYSLOG_IDENTIFIER=aegis-reaper", "-p", "info"); len(r) == 0 {
		t.Error("no journal entries of aegis-reaper")
	}
}
