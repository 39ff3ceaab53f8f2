package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// cluster is three gateways sharing one session store, the way an HA pair
// or an ECMP fleet runs:
//
//	                    public LAN (bridge)
//	client ─────────┬──────────────┬──────────────┐
//	192.0.2.10, .11 │              │              │
//	             pub0 [XDP]     pub0 [XDP]     pub0 [XDP]
//	             192.0.2.1      192.0.2.2      192.0.2.3
//	              gateway A      gateway B      gateway C
//	             198.51.100.1   198.51.100.2   198.51.100.3
//	             priv0 │        priv0 │        priv0 │
//	                   └──────────────┴──────────────┴───── private LAN (bridge)
//	         service ns: 198.51.100.5 controller, .10 service;
//	         etcd members: 198.51.100.41, .42, .43 (one namespace each)
//
// The client's route to the private network, and the service's route
// back, point at one gateway at a time; moving them is what a VRRP
// failover or an ECMP next-hop change does. Each gateway has its own pin
// directory, control plane (--store etcd with mutual TLS) and reaper; the
// store traffic runs on the private side, never through XDP.
type cluster struct {
	t         *testing.T
	client    *tu.Netns
	service   *tu.Netns
	gws       []*clusterGateway
	etcd      *tu.Etcd
	pki       *pkiDir
	activeIdx int
	// storeless runs the control planes with --store none: the control
	// case that shows what the tests see when grants stay on one gateway.
	storeless bool
}

// clusterGateway is one gateway of the cluster. gateway gives it the
// single-gateway helpers (loader, stats, probes) on the shared client and
// service namespaces.
type clusterGateway struct {
	*gateway
	name    string
	pubIP   netip.Addr
	privIP  netip.Addr
	cp      *controlPlane
	reaper  *daemon
	metrics netip.AddrPort
	agent   agentv1.AgentServiceClient
}

const (
	clusterGRPCPort    = 50001
	clusterMetricsPort = 9464
)

// Store timing of the cluster's daemons: short, so that the tests see a
// partition or a lost gateway within seconds, long enough not to flap on
// a machine shared with other builds.
const (
	clusterAckTimeout       = 3 * time.Second
	clusterActivityInterval = 500 * time.Millisecond
)

var gatewayNames = []string{"gw-a", "gw-b", "gw-c"}

// newCluster builds the namespaces, a three-member etcd cluster, loads the
// data path on the three gateways and starts their daemons. Traffic goes
// through gateway A.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	return newClusterWith(t, false)
}

func newClusterWith(t *testing.T, storeless bool) *cluster {
	t.Helper()
	tu.RequireKernel(t)
	c := &cluster{t: t, storeless: storeless}
	pub := tu.NewNetns(t, "aegis-pub-")
	priv := tu.NewNetns(t, "aegis-lan-")
	for _, lan := range []*tu.Netns{pub, priv} {
		lan.Run(t, "ip", "link", "add", "br0", "type", "bridge")
		lan.Run(t, "ip", "link", "set", "br0", "up")
	}
	port := 0
	// attach links dev in ns to a LAN's bridge.
	attach := func(ns *tu.Netns, dev string, lan *tu.Netns, addrs ...string) {
		port++
		p := "p" + strconv.Itoa(port)
		lan.Run(t, "ip", "link", "add", p, "type", "veth", "peer", "name", dev, "netns", ns.Name)
		lan.Run(t, "ip", "link", "set", p, "master", "br0", "up")
		for _, a := range addrs {
			ns.Run(t, "ip", "addr", "add", a, "dev", dev)
		}
		ns.Run(t, "ip", "link", "set", dev, "up")
	}
	c.client = tu.NewNetns(t, "aegis-cli-")
	attach(c.client, "cli0", pub, "192.0.2.10/24", "192.0.2.11/24")
	c.service = tu.NewNetns(t, "aegis-svc-")
	attach(c.service, "srv0", priv, "198.51.100.5/24", "198.51.100.10/24", "198.51.100.20/24")

	var members []tu.EtcdMember
	for i := range 3 {
		ns := tu.NewNetns(t, "aegis-etcd-")
		ip := netip.AddrFrom4([4]byte{198, 51, 100, byte(41 + i)})
		attach(ns, "e0", priv, ip.String()+"/24")
		members = append(members, tu.EtcdMember{Netns: ns, IP: ip})
	}
	for i, name := range gatewayNames {
		ns := tu.NewNetns(t, "aegis-"+name+"-")
		ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		g := &clusterGateway{
			gateway: &gateway{Topology: &tu.Topology{Client: c.client, Gateway: ns, Private: c.service}, t: t, pin: tu.PinDir(t)},
			name:    name,
			pubIP:   netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + i)}),
			privIP:  netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i)}),
		}
		attach(ns, tu.PublicIface, pub, g.pubIP.String()+"/24")
		attach(ns, "priv0", priv, g.privIP.String()+"/24")
		g.metrics = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), clusterMetricsPort)
		c.gws = append(c.gws, g)
	}
	// Until the first activate, no route: nothing reaches the service by
	// accident.
	c.activeIdx = -1

	// The store and the gateways start side by side: etcd's elections
	// take a second either way.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, g := range c.gws {
			g.loader("load", "--group", strconv.Itoa(daemonGID))
		}
	}()
	c.etcd = tu.StartEtcd(t, members)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	c.etcd.ChownClientKey(t, daemonUID, daemonGID)
	c.pki = newPKI(t)
	for _, g := range c.gws {
		c.startDaemons(g)
	}
	c.activate(0)
	return c
}

// storeArgs are the store flags every daemon of gateway g gets.
func (c *cluster) storeArgs(g *clusterGateway) []string {
	if c.storeless {
		return []string{"--store", "none"}
	}
	ca, cert, key := c.etcd.ClientTLS()
	return []string{"--store", c.etcd.StoreFlag(), "--store-ca", ca, "--store-cert", cert, "--store-key", key,
		"--gateway-id", g.name}
}

// startDaemons starts g's control plane (waiting for READY=1, which with a
// store comes after the store's sessions are in the maps) and reaper.
func (c *cluster) startDaemons(g *clusterGateway) {
	c.t.Helper()
	args := append([]string{"--listen-address", g.privIP.String(), "--metrics-address", g.metrics.String(),
		"--store-ack-timeout", clusterAckTimeout.String(), "--activity-interval", clusterActivityInterval.String()},
		c.storeArgs(g)...)
	g.cp = startControlPlane(c.t, g.gateway, c.pki, cpOptions{caps: "+bpf", args: args})
	conn := dialFrom(c.t, c.service, netip.AddrPortFrom(g.privIP, clusterGRPCPort), &tls.Config{
		ServerName: pki.ServerName, RootCAs: c.pki.ca.CertPool(), Certificates: []tls.Certificate{c.pki.controller}})
	g.agent = agentv1.NewAgentServiceClient(conn)
	g.reaper = startDaemon(c.t, g.Gateway, "aegis-reaper", "--pin-path", g.pin, "--cleanup-interval", "500ms",
		"--log-format", "json", "--log-level", "debug")
}

// stopDaemons kills g's control plane and reaper with SIGKILL.
func (c *cluster) stopDaemons(g *clusterGateway) {
	c.t.Helper()
	_ = g.cp.kill(syscall.SIGKILL)
	g.reaper.kill()
}

// activate routes the client's traffic to the private network, and the
// service's replies, through gateway i.
func (c *cluster) activate(i int) {
	c.t.Helper()
	g := c.gws[i]
	c.client.Run(c.t, "ip", "route", "replace", "198.51.100.0/24", "via", g.pubIP.String())
	c.service.Run(c.t, "ip", "route", "replace", "192.0.2.0/24", "via", g.privIP.String())
	c.activeIdx = i
}

func (c *cluster) active() *clusterGateway { return c.gws[c.activeIdx] }

// each runs fn with each gateway active in turn, A, B, C, and leaves A
// active.
func (c *cluster) each(fn func(g *clusterGateway)) {
	c.t.Helper()
	for i, g := range c.gws {
		c.activate(i)
		fn(g)
	}
	c.activate(0)
}

// sessionKeys are the keys of the sessions in g's maps, read from the
// pins, not through the control plane.
func (g *clusterGateway) sessionKeys() map[state.Key]bool {
	g.t.Helper()
	m, err := state.Open(g.pin, state.OpenOptions{})
	if err != nil {
		g.t.Fatalf("%s: %v", g.name, err)
	}
	defer m.Close()
	out := map[state.Key]bool{}
	for s, err := range m.Sessions() {
		if err != nil {
			g.t.Fatalf("%s: read sessions: %v", g.name, err)
		}
		out[s.Key] = true
	}
	return out
}

// metric returns the value of a metric without labels from g's control
// plane, or false if it does not export it.
func (g *clusterGateway) metric(name string) (float64, bool) {
	g.t.Helper()
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			var conn net.Conn
			err := g.Gateway.Do(func() error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				return err
			})
			return conn, err
		}}}
	resp, err := client.Get("http://" + g.metrics.String() + "/metrics")
	if err != nil {
		g.t.Fatalf("%s: scrape metrics: %v", g.name, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				g.t.Fatalf("%s: metric %q: %v", g.name, line, err)
			}
			return f, true
		}
	}
	return 0, false
}

// waitMetric waits up to timeout until g exports name with value want.
func (g *clusterGateway) waitMetric(name string, want float64, timeout time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v, ok := g.metric(name)
		if ok && v == want {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("%s: %s = %v (exported: %v) after %v, want %v\n%s", g.name, name, v, ok, timeout, want, g.cp.out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// daemon is a process run in a namespace as root, its output collected.
type daemon struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	out    *tu.Buffer
	exited chan error
}

func startDaemon(t *testing.T, ns *tu.Netns, name string, args ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, name: name, out: &tu.Buffer{}, exited: make(chan error, 1)}
	d.cmd = ns.Command(bin(name), args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.exited <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.kill()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, lastLines(d.out.String(), 40))
		}
	})
	return d
}

// kill ends the process with SIGKILL and waits for it.
func (d *daemon) kill() {
	if d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	err := <-d.exited
	d.exited <- err
}

// login grants user a session from src to dst through gateway g.
func (g *clusterGateway) login(ctx context.Context, user string, src netip.Addr, dst netip.AddrPort, proto agentv1.Protocol, idle time.Duration) error {
	req := &agentv1.LoginEventRequest{User: user, SrcIp: src.String(), DstIp: dst.Addr().String(),
		DstPort: uint32(dst.Port()), Protocol: proto}
	if idle > 0 {
		req.IdleTimeout = durationpb.New(idle)
	}
	_, err := g.agent.LoginEvent(ctx, req)
	if err != nil {
		return fmt.Errorf("%s: login %s: %w", g.name, user, err)
	}
	return nil
}

// logout revokes user's sessions through g and returns how many.
func (g *clusterGateway) logout(ctx context.Context, user string) (uint32, error) {
	resp, err := g.agent.LogoutEvent(ctx, &agentv1.LogoutEventRequest{User: user})
	if err != nil {
		return 0, fmt.Errorf("%s: logout %s: %w", g.name, user, err)
	}
	return resp.GetRevoked(), nil
}
