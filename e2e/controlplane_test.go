package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// The control plane runs as this user and group, with CAP_BPF only, as
// aegis would in production; the loader hands the pins to the group.
const (
	daemonUID = 65534
	daemonGID = 65534
)

// capBPF is CAP_BPF's bit in /proc/PID/status capability masks.
const capBPF = 1 << 39

// grpcAddr is where the control plane listens: the gateway's private
// address, which the controller dials from the private namespace.
var grpcAddr = netip.AddrPortFrom(tu.GatewayPrivV4, 50001)

// newDaemonGateway is newGateway with the pins handed to daemonGID.
func newDaemonGateway(t *testing.T, loadArgs ...string) *gateway {
	t.Helper()
	return newGateway(t, append([]string{"load", "--group", strconv.Itoa(daemonGID)}, loadArgs...)...)
}

// pkiDir holds a CA, the agent's certificate and a controller's, readable
// by the daemon user.
type pkiDir struct {
	dir        string
	ca         *pki.CA
	controller tls.Certificate
}

func newPKI(t *testing.T) *pkiDir {
	t.Helper()
	dir, err := os.MkdirTemp("", "aegis-e2e-pki-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &pkiDir{dir: dir}
	if p.ca, err = pki.NewCA("aegis e2e CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	p.writeServer(t, p.ca)
	cli, err := p.ca.IssueClient("controller", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if p.controller, err = cli.TLSCertificate(); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeServer (re)writes the agent's files from ca, owned by the daemon.
func (p *pkiDir) writeServer(t *testing.T, ca *pki.CA) {
	t.Helper()
	srv, err := ca.IssueServer(pki.ServerOptions{IPs: []net.IP{grpcAddr.Addr().AsSlice()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.WriteFiles(p.file("agent.crt"), p.file("agent.key")); err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFile(p.file("ca.crt"), ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"agent.crt", "agent.key", "ca.crt"} {
		if err := os.Chown(p.file(f), daemonUID, daemonGID); err != nil {
			t.Fatal(err)
		}
	}
}

func (p *pkiDir) file(name string) string { return filepath.Join(p.dir, name) }

// controlPlane is a running aegis-controlplane in the gateway namespace.
type controlPlane struct {
	t      *testing.T
	g      *gateway
	pki    *pkiDir
	cmd    *exec.Cmd
	out    *tu.Buffer
	notify *tu.NotifySocket
	exited chan error
}

type cpOptions struct {
	// caps are the capabilities the daemon gets ("+bpf"); "" for none.
	caps string
	// env is added to the daemon's environment.
	env []string
	// wrap runs the daemon through another program (socket activation).
	wrap []string
	// noWait does not wait for readiness.
	noWait bool
	// insecure leaves out the TLS flags.
	insecure bool
	// gid is the daemon's group; 0 for daemonGID.
	gid  int
	args []string
	// binary is the aegis-controlplane to run; "" for this build's.
	binary string
}

// startControlPlane runs aegis-controlplane as daemonUID with the given
// capabilities, in the gateway namespace, and waits until it reports
// ready.
func startControlPlane(t *testing.T, g *gateway, p *pkiDir, o cpOptions) *controlPlane {
	t.Helper()
	cp := &controlPlane{t: t, g: g, pki: p, out: &tu.Buffer{}, notify: tu.NewNotifySocket(t, p.dir), exited: make(chan error, 1)}
	gid := o.gid
	if gid == 0 {
		gid = daemonGID
	}
	setpriv := []string{"--reuid=" + strconv.Itoa(daemonUID), "--regid=" + strconv.Itoa(gid), "--clear-groups"}
	if o.caps != "" {
		setpriv = append(setpriv, "--inh-caps="+o.caps, "--ambient-caps="+o.caps)
	} else {
		setpriv = append(setpriv, "--inh-caps=-all")
	}
	args := append(setpriv, "--")
	args = append(args, o.wrap...)
	binary := o.binary
	if binary == "" {
		binary = bin("aegis-controlplane")
	}
	args = append(args, binary,
		"--listen-address", grpcAddr.Addr().String(), "-g", strconv.Itoa(int(grpcAddr.Port())),
		"--pin-path", g.pin, "--monitor-interval", "200ms", "--log-format", "json", "--log-level", "debug")
	if !o.insecure {
		args = append(args, "--tls-cert", p.file("agent.crt"), "--tls-key", p.file("agent.key"),
			"--tls-client-ca", p.file("ca.crt"), "--allowed-client-name", "controller")
	}
	args = append(args, o.args...)
	cp.cmd = g.Gateway.Command("setpriv", args...)
	cp.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+cp.notify.Path)
	cp.cmd.Env = append(cp.cmd.Env, o.env...)
	cp.cmd.Stdout, cp.cmd.Stderr = cp.out, cp.out
	if err := cp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cp.exited <- cp.cmd.Wait() }()
	t.Cleanup(func() {
		cp.kill(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("aegis-controlplane output:\n%s", cp.out.String())
		}
	})
	if !o.noWait {
		cp.ready()
	}
	return cp
}

// ready waits for READY=1.
func (cp *controlPlane) ready() {
	cp.t.Helper()
	select {
	case err := <-cp.exited:
		cp.exited <- err
		cp.t.Fatalf("aegis-controlplane exited before it was ready: %v\n%s", err, cp.out.String())
	default:
	}
	cp.notify.Expect(cp.t, "READY=1", 10*time.Second)
}

// wait waits for the process to exit by itself and returns its error.
func (cp *controlPlane) wait(timeout time.Duration) error {
	cp.t.Helper()
	select {
	case err := <-cp.exited:
		cp.exited <- err
		return err
	case <-time.After(timeout):
		cp.t.Fatalf("aegis-controlplane still running after %v:\n%s", timeout, cp.out.String())
		return nil
	}
}

// kill sends sig and waits for the process to end; it returns its error.
func (cp *controlPlane) kill(sig syscall.Signal) error {
	if cp.cmd.Process == nil {
		return nil
	}
	// nsenter and setpriv exec, so the process is the daemon itself.
	_ = cp.cmd.Process.Signal(sig)
	select {
	case err := <-cp.exited:
		cp.exited <- err
		return err
	case <-time.After(15 * time.Second):
		_ = cp.cmd.Process.Kill()
		cp.t.Errorf("aegis-controlplane did not exit within 15 s of %v", sig)
		err := <-cp.exited
		cp.exited <- err
		return err
	}
}

// dial connects as the Aegis controller does, from the private namespace:
// mutual TLS, server name aegis-agent.
func (cp *controlPlane) dial(cert tls.Certificate) *grpc.ClientConn {
	cp.t.Helper()
	return dialFrom(cp.t, cp.g.Private, grpcAddr, &tls.Config{ServerName: pki.ServerName, RootCAs: cp.pki.ca.CertPool(),
		Certificates: []tls.Certificate{cert}})
}

func dialFrom(t *testing.T, ns *tu.Netns, addr netip.AddrPort, cfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	dialer := func(ctx context.Context, a string) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			var err error
			c, err = (&net.Dialer{}).DialContext(ctx, "tcp", a)
			return err
		})
		return c, err
	}
	conn, err := grpc.NewClient("passthrough:///"+addr.String(), grpc.WithContextDialer(dialer),
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// capEff returns the effective capabilities of the daemon.
func (cp *controlPlane) capEff() uint64 {
	cp.t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", cp.cmd.Process.Pid))
	if err != nil {
		cp.t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				cp.t.Fatal(err)
			}
			return n
		}
	}
	cp.t.Fatal("no CapEff in /proc status")
	return 0
}

func (cp *controlPlane) uid() int {
	cp.t.Helper()
	fi, err := os.Stat(fmt.Sprintf("/proc/%d", cp.cmd.Process.Pid))
	if err != nil {
		cp.t.Fatal(err)
	}
	return int(fi.Sys().(*syscall.Stat_t).Uid)
}

// ip4 is the compat encoding of an IPv4 address.
func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func rpcCtx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

// The controller's own API opens and closes the gate: blocked before, the
// very next packet after SubmitSession passes, blocked again after
// activate=false, and IpChange moves the opening to the new destination.
func TestControlPlaneCompatAPI(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	svcA := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	svcB := netip.AddrPortFrom(tu.ServiceBV4, 8080)
	g.Serve(t, svcA)
	g.Serve(t, svcB)
	tcp := func(dst netip.AddrPort) func() error {
		return func() error { return g.TCP(tu.ClientV4, dst, probeTimeout) }
	}
	udp := func(dst netip.AddrPort) func() error {
		return func() error { return g.UDP(tu.ClientV4, dst, probeTimeout) }
	}
	compat := session.NewSessionManagerClient(cp.dial(p.controller))
	c := rpcCtx(t)
	submit := func(dst netip.Addr, activate bool) {
		t.Helper()
		ack, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(tu.ClientV4), DstIp: ip4(dst), DstPort: 8080, Activate: activate})
		if err != nil || !ack.GetSuccess() {
			t.Fatalf("SubmitSession(%s, activate=%v): %v %v", dst, activate, ack, err)
		}
	}

	g.expectBlocked("TCP before the login", bpf.ReasonNoSession, tcp(svcA))
	submit(tu.ServiceAV4, true)
	// No sleep: acknowledged means the data path already passes it.
	g.expectPass("TCP right after SubmitSession", bpf.ReasonSession, tcp(svcA))
	g.expectPass("UDP right after SubmitSession", bpf.ReasonSession, udp(svcA))
	g.expectBlocked("TCP to another service", bpf.ReasonNoSession, tcp(svcB))

	submit(tu.ServiceAV4, false)
	g.expectBlocked("TCP right after activate=false", bpf.ReasonNoSession, tcp(svcA))
	g.expectBlocked("UDP right after activate=false", bpf.ReasonNoSession, udp(svcA))

	submit(tu.ServiceAV4, true)
	ack, err := compat.IpChange(c, &session.IpChangeList{IpChanges: []*session.IpChangeEvent{{OldIp: ip4(tu.ServiceAV4), NewIp: ip4(tu.ServiceBV4)}}})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("IpChange: %v %v", ack, err)
	}
	g.expectPass("TCP to the new destination right after IpChange", bpf.ReasonSession, tcp(svcB))
	g.expectPass("UDP to the new destination right after IpChange", bpf.ReasonSession, udp(svcB))
	g.expectBlocked("TCP to the old destination after IpChange", bpf.ReasonNoSession, tcp(svcA))

	// MonitorSessions reports the moved session.
	mon, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := mon.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetSessions()) != 1 || list.GetSessions()[0].GetDstIp() != ip4(tu.ServiceBV4) || list.GetSessions()[0].GetTimeLeft() < 55 {
		t.Fatalf("MonitorSessions: %v", list)
	}

	// Rotated certificates are picked up on SIGHUP.
	newCA, err := pki.NewCA("rotated CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p.writeServer(t, newCA)
	skip := strings.Count(cp.out.String(), "\n")
	if err := cp.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		lines := strings.Split(cp.out.String(), "\n")
		if len(lines) > skip && strings.Contains(strings.Join(lines[skip:], "\n"), "reloaded the TLS files") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reload logged after SIGHUP:\n%s", cp.out.String())
		}
	}
	nc, err := newCA.IssueClient("controller", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ncert, _ := nc.TLSCertificate()
	conn := dialFrom(t, g.Private, grpcAddr, &tls.Config{ServerName: pki.ServerName, RootCAs: newCA.CertPool(), Certificates: []tls.Certificate{ncert}})
	if _, err := session.NewSessionManagerClient(conn).SubmitSession(c,
		&session.LoginEvent{SrcIp: ip4(tu.ClientV4), DstIp: ip4(tu.ServiceBV4), DstPort: 8080, Activate: false}); err != nil {
		t.Fatalf("with the rotated certificates: %v", err)
	}
	g.expectBlocked("TCP after the revoke over rotated certificates", bpf.ReasonNoSession, tcp(svcB))

	// SIGTERM: STOPPING=1, then a clean exit.
	if err := cp.kill(syscall.SIGTERM); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, cp.out.String())
	}
	cp.notify.Expect(t, "STOPPING=1", time.Second)
}

// The full API, both families: LoginEvent opens exactly the session asked
// for, LogoutEvent closes it.
func TestControlPlaneAgentAPI(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", env: []string{"WATCHDOG_USEC=200000"}})
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	c := rpcCtx(t)
	for _, fam := range []struct {
		name               string
		client, other, svc netip.Addr
	}{
		{"ipv4", tu.ClientV4, tu.OtherClientV4, tu.ServiceAV4},
		{"ipv6", tu.ClientV6, tu.OtherClientV6, tu.ServiceAV6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			g.t = t
			svc := netip.AddrPortFrom(fam.svc, 9000)
			g.Serve(t, svc)
			tcp := func(src netip.Addr) func() error { return func() error { return g.TCP(src, svc, probeTimeout) } }
			udp := func() error { return g.UDP(fam.client, svc, probeTimeout) }

			g.expectBlocked("TCP before LoginEvent", bpf.ReasonNoSession, tcp(fam.client))
			resp, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "alice", SrcIp: fam.client.String(),
				DstIp: fam.svc.String(), DstPort: 9000, Protocol: agentv1.Protocol_PROTOCOL_TCP})
			if err != nil || !resp.GetCreated() {
				t.Fatalf("LoginEvent: %v %v", resp, err)
			}
			g.expectPass("TCP right after LoginEvent", bpf.ReasonSession, tcp(fam.client))
			g.expectBlocked("UDP: not granted", bpf.ReasonNoSession, udp)
			g.expectBlocked("TCP from another client", bpf.ReasonNoSession, tcp(fam.other))

			out, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"})
			if err != nil || out.GetRevoked() != 1 {
				t.Fatalf("LogoutEvent: %v %v", out, err)
			}
			g.expectBlocked("TCP right after LogoutEvent", bpf.ReasonNoSession, tcp(fam.client))
		})
	}
	g.t = t
	// Least privilege: an unprivileged user with CAP_BPF and nothing else.
	if uid := cp.uid(); uid != daemonUID {
		t.Fatalf("daemon runs as uid %d", uid)
	}
	if caps := cp.capEff(); caps != capBPF {
		t.Fatalf("daemon's effective capabilities %#x, want CAP_BPF only (%#x)", caps, uint64(capBPF))
	}
	// The systemd watchdog is pinged.
	cp.notify.Expect(t, "WATCHDOG=1", 2*time.Second) // READY=1 came at start
}

// The least-privilege controls: a user outside the pins' group cannot
// open them, even with CAP_BPF, and says so in one line. Without CAP_BPF,
// kernels before 6.5 with unprivileged BPF disabled refuse every bpf()
// call; later ones check only the pins' file permissions, so there the
// daemon works without any capability.
func TestControlPlanePrivilegeControls(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)

	t.Run("outside the pins' group", func(t *testing.T) {
		cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", gid: daemonGID - 1, noWait: true})
		err := cp.wait(10 * time.Second)
		out := cp.out.String()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out, "permission denied") ||
			!strings.Contains(out, "group") {
			t.Fatalf("outside the group: %v, output:\n%s", err, out)
		}
		if lines := strings.Split(strings.TrimSpace(out), "\n"); !strings.HasPrefix(lines[len(lines)-1], "aegis-controlplane: ") {
			t.Fatalf("last line is not the one-line error: %q", lines[len(lines)-1])
		}
	})

	t.Run("without CAP_BPF", func(t *testing.T) {
		cp := startControlPlane(t, g, p, cpOptions{noWait: true})
		if bpfSyscallNeedsCapBPF(t) {
			err := cp.wait(10 * time.Second)
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(cp.out.String(), "CAP_BPF") {
				t.Fatalf("without CAP_BPF: %v, output:\n%s", err, cp.out.String())
			}
			return
		}
		cp.ready()
		if caps := cp.capEff(); caps != 0 {
			t.Fatalf("effective capabilities %#x, want none", caps)
		}
		_, err := agentv1.NewAgentServiceClient(cp.dial(p.controller)).LoginEvent(rpcCtx(t), &agentv1.LoginEventRequest{
			User: "alice", SrcIp: tu.ClientV4.String(), DstIp: tu.ServiceAV4.String(), DstPort: 22})
		if err != nil {
			t.Fatalf("this kernel lets the pins' group use them without CAP_BPF, yet the grant failed: %v", err)
		}
		t.Logf("kernel %s checks only the pins' permissions: no capability needed", kernelRelease(t))
	})
}

// bpfSyscallNeedsCapBPF reports whether this kernel refuses every bpf()
// call of a process without CAP_BPF: before 6.5, when
// kernel.unprivileged_bpf_disabled is set.
func bpfSyscallNeedsCapBPF(t *testing.T) bool {
	t.Helper()
	disabled, err := os.ReadFile("/proc/sys/kernel/unprivileged_bpf_disabled")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(disabled)) == "0" {
		return false
	}
	var major, minor int
	if _, err := fmt.Sscanf(kernelRelease(t), "%d.%d", &major, &minor); err != nil {
		t.Fatal(err)
	}
	return major < 6 || major == 6 && minor < 5
}

func kernelRelease(t *testing.T) string {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

// kill -9 of the control plane, and a new one, while a client streams
// through an established session: not one packet lost, every session
// still there.
func TestControlPlaneRestartLosesNothing(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	svc := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	server := g.Serve(t, svc)
	c := rpcCtx(t)
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	compat := session.NewSessionManagerClient(cp.dial(p.controller))
	if _, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
		DstIp: tu.ServiceAV4.String(), DstPort: 5353, Protocol: agentv1.Protocol_PROTOCOL_UDP}); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "bob", SrcIp: tu.ClientV6.String(),
		DstIp: tu.ServiceAV6.String(), DstPort: 443}); err != nil {
		t.Fatal(err)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(tu.OtherClientV4), DstIp: ip4(tu.ServiceBV4), DstPort: 22, Activate: true}); err != nil {
		t.Fatal(err)
	}
	before, err := agent.ListSessions(c, &agentv1.ListSessionsRequest{})
	if err != nil || len(before.GetSessions()) != 4 {
		t.Fatalf("sessions before the restart: %v %v", before, err)
	}

	const pps = 2000
	sctx, stop := context.WithCancel(context.Background())
	sent := make(chan uint64, 1)
	go func() {
		n, err := g.Stream(sctx, tu.ClientV4, svc, pps)
		if err != nil {
			t.Error(err)
		}
		sent <- n
	}()
	time.Sleep(300 * time.Millisecond)
	if err := cp.kill(syscall.SIGKILL); err == nil {
		t.Fatal("kill -9 reported a clean exit")
	}
	time.Sleep(200 * time.Millisecond) // traffic with no control plane at all
	cp2 := startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	time.Sleep(300 * time.Millisecond)
	stop()
	n := <-sent
	if n < pps/2 {
		t.Fatalf("only %d datagrams sent", n)
	}
	if got := server.WaitReceived(n, 3*time.Second); got != n {
		t.Fatalf("%d of %d datagrams arrived across the restart: %d lost", got, n, n-got)
	}
	after, err := agentv1.NewAgentServiceClient(cp2.dial(p.controller)).ListSessions(c, &agentv1.ListSessionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(after.GetSessions()) != len(before.GetSessions()) {
		t.Fatalf("sessions after the restart: %v, before: %v", after.GetSessions(), before.GetSessions())
	}
	for i, s := range after.GetSessions() {
		b := before.GetSessions()[i]
		// Creation times are kept; their wall-clock rendering may move by
		// the time between two clock reads.
		drift := s.GetCreateTime().AsTime().Sub(b.GetCreateTime().AsTime()).Abs()
		if s.GetUser() != b.GetUser() || s.GetSrcIp() != b.GetSrcIp() || s.GetDstIp() != b.GetDstIp() ||
			s.GetDstPort() != b.GetDstPort() || s.GetProtocol() != b.GetProtocol() || drift > 10*time.Millisecond {
			t.Fatalf("session %d after the restart %v, before %v", i, s, b)
		}
	}
	t.Logf("%d datagrams at %d/s across kill -9 and restart, none lost", n, pps)
}

// Started from a socket systemd holds (here systemd-socket-activate): a
// controller that connects before the daemon runs is served by it.
func TestControlPlaneSocketActivation(t *testing.T) {
	if _, err := exec.LookPath("systemd-socket-activate"); err != nil {
		t.Fatal("systemd-socket-activate not installed (Debian package systemd; make setup installs it)")
	}
	g := newDaemonGateway(t)
	p := newPKI(t)
	listen := grpcAddr.String()
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", noWait: true,
		wrap: []string{"systemd-socket-activate", "-l", listen, "-E", "NOTIFY_SOCKET"},
		// Ignored when a socket is passed: prove it by giving another port.
		args: []string{"-g", "1"}})
	// systemd-socket-activate starts the daemon on the first connection.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(cp.out.String(), "Listening on"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("systemd-socket-activate is not listening:\n%s", cp.out.String())
		}
	}
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	if _, err := agent.LoginEvent(rpcCtx(t), &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
		DstIp: tu.ServiceAV4.String(), DstPort: 22}); err != nil {
		t.Fatalf("LoginEvent through the activated socket: %v\n%s", err, cp.out.String())
	}
	cp.ready()
	if !strings.Contains(cp.out.String(), "using the listening socket passed by systemd") {
		t.Fatalf("the daemon did not use the passed socket:\n%s", cp.out.String())
	}

	// --insecure on a passed socket that is not loopback is refused.
	g2 := startControlPlane(t, g, p, cpOptions{caps: "+bpf", noWait: true,
		wrap:     []string{"systemd-socket-activate", "-l", netip.AddrPortFrom(tu.GatewayPrivV4, 50002).String()},
		insecure: true, args: []string{"--insecure"}})
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(g2.out.String(), "Listening on"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("systemd-socket-activate is not listening:\n%s", g2.out.String())
		}
	}
	_ = g.Private.Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(tu.GatewayPrivV4, 50002).String(), time.Second)
		if err == nil {
			c.Close()
		}
		return nil
	})
	err := g2.wait(10 * time.Second)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(g2.out.String(), "loopback") {
		t.Fatalf("--insecure on an activated non-loopback socket: %v\n%s", err, g2.out.String())
	}
}
